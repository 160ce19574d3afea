//! Overload against the real binary: slow consumers among a thousand subscribers, connection
//! and publish floods past the configured limits, connect-subscribe-disconnect churn (graceful,
//! reset and pong-timeout sockets, presence included) and a short soak. Each test checks the
//! codes the server sheds load with and that `/stats` (the node's true counts, tasks, file
//! descriptors and memory) ends where it started. The tests hold `HEAVY` so that they do not
//! load the machine at the same time; every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::support::process::Process;
use crate::support::*;

/// Held by each test here: two of them at once on a small machine would only measure each other.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A config file for `--config`, removed when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str, config: Value) -> Self {
        let path = std::env::temp_dir().join(format!(
            "sockudo-overload-{name}-{}-{}.json",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(&path, config.to_string()).unwrap();
        Self(path)
    }

    fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Opens a WebSocket to the default app, optionally from a loopback source address, and waits
/// for `connection_established`. Returns the socket and its id. A `stalled` socket gets a small
/// receive buffer and announces an MSS of 1400, both before connecting: over loopback the MSS
/// is about 64 KiB and Linux sizes the server's send buffer from it (up to `tcp_wmem`'s 4 MB),
/// which would swallow a stalled client's whole backlog before the server's own queue saw any;
/// with 1400 the kernel holds about 100 KB, as for a client across a network.
async fn open(port: u16, source: Option<Ipv4Addr>, stalled: bool) -> Result<(Ws, String), String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if stalled {
        socket.set_recv_buffer_size(4096).map_err(|e| e.to_string())?;
        socket2::SockRef::from(&socket).set_tcp_mss(1400).map_err(|e| e.to_string())?;
    }
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip.into(), 0)).map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let step = |what: &'static str| move |_| format!("{what} timed out");
    let stream = tokio::time::timeout(WAIT, socket.connect(SocketAddr::from(([127, 0, 0, 1], port))))
        .await
        .map_err(step("connect"))?
        .map_err(|e| format!("connect: {e}"))?;
    let url = format!("ws://127.0.0.1:{port}/app/{KEY}?protocol=7&client=overload&version=0.1");
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)))
        .await
        .map_err(step("handshake"))?
        .map_err(|e| format!("handshake: {e}"))?;
    let welcome = wait_for(&mut ws, |f| f["event"] != "pusher:ping", WAIT).await?;
    if welcome["event"] != "pusher:connection_established" {
        return Err(format!("refused: {welcome}"));
    }
    let socket_id = data(&welcome)["socket_id"].as_str().unwrap_or_default().to_owned();
    Ok((ws, socket_id))
}

/// Reads frames (answering `pusher:ping`) until one matches `want`; a close or an error ends
/// the wait with the reason.
async fn wait_for(ws: &mut Ws, want: impl Fn(&Value) -> bool, within: Duration) -> Result<Value, String> {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(t.as_str()).map_err(|e| e.to_string())?;
                    if want(&v) {
                        return Ok(v);
                    }
                    if v["event"] == "pusher:ping" {
                        ws.send(pong()).await.map_err(|e| e.to_string())?;
                    }
                }
                Some(Ok(Message::Close(f))) => return Err(format!("closed: {f:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("connection ended".into()),
            }
        }
    };
    tokio::time::timeout(within, read).await.map_err(|_| format!("nothing matching within {within:?}"))?
}

fn pong() -> Message {
    Message::text(r#"{"event":"pusher:pong","data":{}}"#)
}

/// Subscribes and waits for the server's answer (a success or a `pusher:error`).
async fn subscribe(
    ws: &mut Ws,
    channel: &str,
    auth: Option<String>,
    channel_data: Option<String>,
) -> Result<(), String> {
    let mut d = json!({"channel": channel});
    if let Some(a) = auth {
        d["auth"] = a.into();
    }
    if let Some(cd) = channel_data {
        d["channel_data"] = cd.into();
    }
    ws.send(Message::text(json!({"event": "pusher:subscribe", "data": d}).to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let answer = wait_for(
        ws,
        |f| {
            (f["event"] == "pusher_internal:subscription_succeeded" && f["channel"] == channel)
                || f["event"] == "pusher:error"
                || f["event"] == "pusher:subscription_error"
        },
        WAIT * 2,
    )
    .await?;
    if answer["event"] == "pusher_internal:subscription_succeeded" {
        Ok(())
    } else {
        Err(format!("subscription refused: {answer}"))
    }
}

/// The signed auth (and channel data) for a presence channel.
fn presence_auth(socket_id: &str, channel: &str, user_id: &str) -> (String, String) {
    let data = json!({"user_id": user_id, "user_info": {}}).to_string();
    let sig = sockudo::auth::sign(SECRET, &format!("{socket_id}:{channel}:{data}"));
    (format!("{KEY}:{sig}"), data)
}

/// A signed publish with the caller's client (keep-alive), returning the whole response.
async fn publish(http: &reqwest::Client, port: u16, channel: &str, event: &str, data: &str) -> reqwest::Response {
    let path = format!("/apps/{APP_ID}/events");
    let body = json!({"name": event, "channel": channel, "data": data}).to_string();
    let query = signed_query(KEY, SECRET, "POST", &path, &[], Some(&body), now());
    let send = http
        .post(format!("http://127.0.0.1:{port}{path}?{query}"))
        .header("content-type", "application/json")
        .body(body)
        .send();
    tokio::time::timeout(WAIT * 4, send).await.expect("publish answered in time").expect("publish")
}

/// The node's `/stats`.
async fn stats(http: &reqwest::Client, metrics_port: u16) -> Value {
    let get = http.get(format!("http://127.0.0.1:{metrics_port}/stats")).send();
    let resp = tokio::time::timeout(WAIT, get).await.expect("stats in time").expect("stats");
    resp.json().await.expect("stats JSON")
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("/stats has no {key}: {v}"))
}

/// The Prometheus text of `/metrics`.
async fn scrape(http: &reqwest::Client, metrics_port: u16) -> String {
    let get = http.get(format!("http://127.0.0.1:{metrics_port}/metrics")).send();
    tokio::time::timeout(WAIT, get).await.expect("scrape in time").expect("scrape").text().await.expect("text")
}

/// The sum of every series of `name` whose labels include `labels`.
fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, rest) = series.split_at(series.find('{').unwrap_or(series.len()));
            (n == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn errors_of(text: &str, error_type: &str) -> f64 {
    sum(text, "sockudo_connection_errors_total", &[("error_type", error_type)])
}

/// 1,000 subscribers of one channel, 10 of which never read (see `open`: they back up at once):
/// the 10 are closed with 4100 once their queue passes its byte cap, each counted once, and
/// find the close frame after what was buffered for them, while the 990 others receive every
/// publish in order, and the server's memory stays under a bound derived from the configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_are_closed_with_4100_while_the_others_receive_everything() {
    let _heavy = HEAVY.lock().await;
    const READERS: usize = 990;
    const STALLED: usize = 10;
    const QUEUE_KB: u64 = 64;
    const HARD_MAX_KB: u64 = 16;
    const WRITE_BUFFER: u64 = 4096;
    // Under the queue's cap (a bigger frame would overflow every queue at once), and big enough
    // that a stalled socket passes the cap within a few dozen publishes.
    const PAYLOAD: usize = 16 * 1024;
    // Publishes after the last slow consumer was closed: the others keep receiving.
    const AFTER: u64 = 5;
    const MAX_PUBLISHES: u64 = 600;
    let cfg = ConfigFile::new(
        "slow",
        json!({"websocket": {
            "max_queue_kb": QUEUE_KB,
            "write_buffer_size": WRITE_BUFFER,
            "max_message_size_kb": HARD_MAX_KB,
            "hard_max_message_size_kb": HARD_MAX_KB,
            // The server keeps a stalled socket until its close frame is written, up to this:
            // long enough for the test to read them all after the flood.
            "write_timeout_seconds": 60
        }}),
    );
    let server = Process::start_with_args(&["--config", &cfg.arg()], &[("LOG_LEVEL", "warn".into())]).await;
    let http = reqwest::Client::new();

    // The readers: every frame is parsed and its sequence number checked in its task.
    let received = Arc::new(AtomicUsize::new(0));
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..READERS).map(|_| AtomicU64::new(0)).collect());
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    let wake = Arc::new(Notify::new());
    let port = server.port;
    let opened: Vec<Ws> = futures_util::stream::iter(0..READERS)
        .map(|_| async move {
            let (mut ws, _) = open(port, None, false).await.expect("reader connects");
            subscribe(&mut ws, "firehose", None, None).await.expect("reader subscribes");
            ws
        })
        .buffer_unordered(50)
        .collect()
        .await;
    let mut readers = Vec::new();
    for (i, ws) in opened.into_iter().enumerate() {
        let (received, counts, problems, wake) = (received.clone(), counts.clone(), problems.clone(), wake.clone());
        readers.push(tokio::spawn(read_in_order(ws, i, received, counts, problems, wake)));
    }
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let (mut ws, _) = open(port, None, true).await.expect("stalled client connects");
        subscribe(&mut ws, "firehose", None, None).await.expect("stalled client subscribes");
        stalled.push(ws);
    }
    let at_start = stats(&http, server.metrics_port).await;
    assert_eq!(n(&at_start, "connections"), (READERS + STALLED) as u64, "{at_start}");
    let baseline_rss = n(&at_start, "rss_bytes");
    let slow_before = errors_of(&scrape(&http, server.metrics_port).await, "slow_consumer");

    // Publish in lock step with the readers (each publish waits until all 990 have it), so a
    // reader's queue never holds more than one publish and only the stalled ones overflow.
    let round = Round {
        http: &http,
        server: &server,
        received: &received,
        problems: &problems,
        wake: &wake,
        pad: "x".repeat(PAYLOAD),
    };
    let mut max_rss = baseline_rss;
    let mut published = 0u64;
    loop {
        published += 1;
        assert!(published <= MAX_PUBLISHES, "the stalled clients were not all closed after {MAX_PUBLISHES} publishes");
        let (rss, slow) = round.publish(published, READERS).await;
        max_rss = max_rss.max(rss);
        if slow - slow_before >= STALLED as f64 {
            break;
        }
    }
    let closed_at = published;

    // The stalled clients now read what the server had buffered for them: the first publishes
    // in order, then the close frame with 4100 (the server keeps the socket for it up to the
    // write timeout).
    let outcomes = futures_util::future::join_all(stalled.into_iter().map(|mut ws| async move {
        let mut next = 1u64;
        let read = async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        if let Some(seq) = big_seq(t.as_str()) {
                            if seq != next {
                                return Err(format!("publish {seq} where {next} was due"));
                            }
                            next += 1;
                        }
                    }
                    Some(Ok(Message::Close(Some(f)))) => return Ok(u16::from(f.code)),
                    Some(Ok(Message::Close(None))) => return Err("a close frame without a code".to_owned()),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("no close frame: {e}")),
                    None => return Err("no close frame: the connection ended".to_owned()),
                }
            }
        };
        let code = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .unwrap_or_else(|_| Err("no close within 30 s".into()));
        (code, next - 1)
    }))
    .await;
    for (code, got) in &outcomes {
        assert_eq!(code, &Ok(4100), "a stalled client (it had read {got} publishes)");
        assert!(*got < closed_at, "a stalled client received everything");
    }

    // The others keep receiving.
    for _ in 0..AFTER {
        published += 1;
        let (rss, _) = round.publish(published, READERS).await;
        max_rss = max_rss.max(rss);
    }
    let text = scrape(&http, server.metrics_port).await;
    assert_eq!(errors_of(&text, "slow_consumer") - slow_before, STALLED as f64, "each slow consumer is counted once");
    let end = stats(&http, server.metrics_port).await;
    assert_eq!(n(&end, "connections"), READERS as u64, "only the readers remain: {end}");
    let problems = problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "readers: {problems:?}");
    for (i, c) in counts.iter().enumerate() {
        assert_eq!(c.load(Ordering::Acquire), published, "reader {i} received every publish");
    }

    // The bound. The outbox drops a slow consumer's queue at its cap, so each connection holds
    // at most: its queue (QUEUE_KB; a reader in lock step holds one frame of it) plus the
    // WebSocket writer's buffer, which the server caps at write_buffer_size + max_queue_kb +
    // hard_max_message_size_kb (and which keeps its capacity after a flush). Over 1,000
    // connections that is 1,000 x (64 + 4 + 64 + 16) KiB = 145 MiB in the worst case where every
    // buffer reached its cap at once; in lock step only the 10 stalled ones can. Add 64 MiB for
    // the allocator's slack, the HTTP bodies of publishes and the runtime. An unbounded queue
    // would instead grow by 16 KiB per publish per stalled client without limit.
    let per_connection = (QUEUE_KB * 1024) + WRITE_BUFFER + (QUEUE_KB + HARD_MAX_KB) * 1024;
    let bound = baseline_rss + (READERS + STALLED) as u64 * per_connection + 64 * 1024 * 1024;
    eprintln!(
        "slow consumers: all closed after {closed_at} publishes of {PAYLOAD} B; RSS {} MiB at start, max {} MiB, bound {} MiB",
        baseline_rss >> 20,
        max_rss >> 20,
        bound >> 20
    );
    assert!(max_rss <= bound, "RSS peaked at {max_rss} B, above the bound of {bound} B");
    for r in readers {
        r.abort();
    }
    server.stop().await;
}

/// One publish of the firehose test, in lock step with the readers.
struct Round<'a> {
    http: &'a reqwest::Client,
    server: &'a Process,
    received: &'a AtomicUsize,
    problems: &'a Mutex<Vec<String>>,
    wake: &'a Notify,
    pad: String,
}

impl Round<'_> {
    /// Publishes `seq` and waits (bounded) until every reader has it; returns the server's RSS
    /// and its count of slow consumers afterwards.
    async fn publish(&self, seq: u64, readers: usize) -> (u64, f64) {
        let resp = publish(self.http, self.server.port, "firehose", "big", &format!("{seq}:{}", self.pad)).await;
        assert_eq!(resp.status(), 200, "publish {seq}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.received.load(Ordering::Acquire) < readers * seq as usize {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "publish {seq} did not reach every reader within 30 s: {:?}",
                self.problems.lock().unwrap()
            );
            let _ = tokio::time::timeout(left, self.wake.notified()).await;
        }
        let rss = n(&stats(self.http, self.server.metrics_port).await, "rss_bytes");
        (rss, errors_of(&scrape(self.http, self.server.metrics_port).await, "slow_consumer"))
    }
}

/// The sequence number of a `big` publish (`"data":"SEQ:xxx…"`), without parsing the padding.
fn big_seq(text: &str) -> Option<u64> {
    if !text.contains(r#""event":"big""#) {
        return None;
    }
    let at = text.find(r#""data":""#)? + 8;
    let rest = &text[at..];
    rest[..rest.find(':')?].parse().ok()
}

/// A reader of the firehose: checks that publishes arrive in order, counts them and answers pings.
async fn read_in_order(
    mut ws: Ws,
    index: usize,
    received: Arc<AtomicUsize>,
    counts: Arc<Vec<AtomicU64>>,
    problems: Arc<Mutex<Vec<String>>>,
    wake: Arc<Notify>,
) {
    let mut next = 1u64;
    loop {
        let problem = match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                if let Some(seq) = big_seq(t.as_str()) {
                    if seq == next {
                        next += 1;
                        counts[index].store(seq, Ordering::Release);
                        received.fetch_add(1, Ordering::AcqRel);
                        wake.notify_one();
                        continue;
                    }
                    format!("reader {index}: publish {seq} where {next} was due")
                } else if t.as_str().contains(r#""event":"pusher:ping""#) {
                    let _ = ws.send(pong()).await;
                    continue;
                } else {
                    continue;
                }
            }
            Some(Ok(Message::Close(f))) => format!("reader {index} closed by the server: {f:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => format!("reader {index}: {e}"),
            None => format!("reader {index}: connection ended"),
        };
        problems.lock().unwrap().push(problem);
        wake.notify_one();
        return;
    }
}

/// How one connection attempt ended.
#[derive(Debug)]
enum Attempt {
    Connected(Box<Ws>),
    /// `pusher:error` with this code, then a close frame with this code.
    Refused {
        error: u64,
        close: Option<u16>,
    },
    /// The upgrade was answered with this HTTP status (and `Retry-After`, if any).
    Http {
        status: u16,
        retry_after: Option<String>,
    },
    // Read only through `Debug`, in assertion messages.
    #[allow(dead_code)]
    Failed(String),
}

/// One connection attempt, classified.
async fn attempt(port: u16) -> Attempt {
    use tokio_tungstenite::tungstenite::Error;
    let url = format!("ws://127.0.0.1:{port}/app/{KEY}?protocol=7");
    let mut ws = match tokio::time::timeout(WAIT * 2, tokio_tungstenite::connect_async(url)).await {
        Err(_) => return Attempt::Failed("handshake timed out".into()),
        Ok(Err(Error::Http(resp))) => {
            let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            return Attempt::Http { status: resp.status().as_u16(), retry_after };
        }
        Ok(Err(e)) => return Attempt::Failed(e.to_string()),
        Ok(Ok((ws, _))) => ws,
    };
    let first = match tokio::time::timeout(WAIT * 2, ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(t.as_str()).unwrap_or_default(),
        other => return Attempt::Failed(format!("no first frame: {other:?}")),
    };
    if first["event"] == "pusher:connection_established" {
        return Attempt::Connected(Box::new(ws));
    }
    let error = data(&first)["code"].as_u64().unwrap_or(0);
    let close = loop {
        match tokio::time::timeout(WAIT * 2, ws.next()).await {
            Ok(Some(Ok(Message::Close(f)))) => break f.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            _ => break None,
        }
    };
    Attempt::Refused { error, close }
}

/// A probe: a fresh client connects, subscribes and receives a publish, each step bounded.
async fn probe(http: &reqwest::Client, port: u16, channel: &str) -> Result<(), String> {
    let (mut ws, _) = open(port, None, false).await?;
    subscribe(&mut ws, channel, None, None).await?;
    let status = publish(http, port, channel, "probe", "p").await.status();
    if status != 200 {
        return Err(format!("publish answered {status}"));
    }
    wait_for(&mut ws, |f| f["event"] == "probe", WAIT).await.map(|_| ())
}

/// Connection and publish floods well past the node's limits (`max_connections` 100, 20 API
/// events per second for the app): every refusal carries its code (4100 on the socket, 429
/// with `Retry-After` and `X-RateLimit-*` on the API), nothing else fails, and afterwards a
/// fresh client connects, subscribes and receives a publish within a bounded time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_past_the_limits_are_shed_with_codes_and_the_node_recovers() {
    let _heavy = HEAVY.lock().await;
    const MAX_CONNECTIONS: usize = 100;
    const EVENTS_PER_SECOND: usize = 20;
    let cfg = ConfigFile::new(
        "flood",
        json!({
            "max_connections": MAX_CONNECTIONS,
            "app_manager": {"array": {"apps": [{
                "id": APP_ID, "key": KEY, "secret": SECRET,
                "max_backend_events_per_second": EVENTS_PER_SECOND
            }]}}
        }),
    );
    let server = Process::start_with_args(&["--config", &cfg.arg()], &[("LOG_LEVEL", "warn".into())]).await;
    let http = reqwest::Client::new();
    let port = server.port;

    // Three times the limit, 100 at a time; the connected ones stay open.
    let outcomes: Vec<Attempt> =
        futures_util::stream::iter(0..3 * MAX_CONNECTIONS).map(|_| attempt(port)).buffer_unordered(100).collect().await;
    let mut held = Vec::new();
    let mut refused = 0;
    let mut other = Vec::new();
    for o in outcomes {
        match o {
            Attempt::Connected(ws) => held.push(ws),
            Attempt::Refused { error: 4100, close: Some(4100) } => refused += 1,
            o => other.push(o),
        }
    }
    assert!(other.is_empty(), "attempts that were neither connected nor refused with 4100: {other:?}");
    assert_eq!(held.len(), MAX_CONNECTIONS, "connected up to max_connections");
    assert_eq!(refused, 2 * MAX_CONNECTIONS);
    let text = scrape(&http, server.metrics_port).await;
    assert_eq!(errors_of(&text, "over_capacity"), (2 * MAX_CONNECTIONS) as f64);
    assert_eq!(n(&stats(&http, server.metrics_port).await, "connections"), MAX_CONNECTIONS as u64);

    // Publishes as fast as 50 at a time go, until the limit shows (bounded: a node slower
    // than 20 publishes a second would end the loop too).
    let started = Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let round: Vec<(u16, Option<String>, Option<String>)> = futures_util::stream::iter(0..500)
            .map(|i| {
                let http = &http;
                async move {
                    let resp = publish(http, port, "flood", "e", &i.to_string()).await;
                    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
                    (resp.status().as_u16(), header("x-ratelimit-limit"), header("retry-after"))
                }
            })
            .buffer_unordered(50)
            .collect()
            .await;
        statuses.extend(round);
        if statuses.iter().any(|(s, _, _)| *s == 429) {
            break;
        }
    }
    let spanned = started.elapsed().as_secs() + 2;
    let ok = statuses.iter().filter(|(s, _, _)| *s == 200).count();
    let limited: Vec<_> = statuses.iter().filter(|(s, _, _)| *s == 429).collect();
    assert_eq!(ok + limited.len(), statuses.len(), "only 200 and 429: {statuses:?}");
    assert!(!limited.is_empty(), "a publish flood is refused with 429");
    for (_, limit, retry_after) in &limited {
        assert_eq!(limit.as_deref(), Some("20"));
        assert_eq!(retry_after.as_deref(), Some("1"));
    }
    // Fixed one-second windows: at most the limit in each wall-clock second the flood touched.
    assert!(ok <= EVENTS_PER_SECOND * spanned as usize, "{ok} publishes accepted in {spanned} windows");

    // Recovery: the held sockets go away; a fresh client gets in and receives within seconds.
    drop(held);
    let ended = Instant::now();
    let recovered = eventually(Duration::from_secs(20), || probe(&http, port, "after-flood").map(|r| r.is_ok())).await;
    assert!(recovered, "no fresh client connected, subscribed and received within 20 s of the flood");
    eprintln!(
        "floods: {refused} sockets refused with 4100, {} of {} publishes with 429; recovered in {:.2} s",
        limited.len(),
        statuses.len(),
        ended.elapsed().as_secs_f64()
    );
    let live = http.get(format!("http://127.0.0.1:{port}/live")).send().await.expect("live").status();
    assert_eq!(live, 200);
    // Exits 0 on SIGTERM: it never aborted.
    server.stop().await;
}

/// A connection flood from one address past `rate_limits.connections_per_ip_per_second`: the
/// upgrades over the limit are refused with 429 and `Retry-After`, each counted, nothing else
/// fails, and a fresh client gets in once the window passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_from_one_address_is_refused_with_429() {
    let _heavy = HEAVY.lock().await;
    const PER_SECOND: usize = 20;
    let cfg = ConfigFile::new("per-ip", json!({"rate_limits": {"connections_per_ip_per_second": PER_SECOND}}));
    let server = Process::start_with_args(&["--config", &cfg.arg()], &[("LOG_LEVEL", "warn".into())]).await;
    let http = reqwest::Client::new();
    let port = server.port;
    let started = Instant::now();
    let (mut connected, mut limited, mut other) = (0, 0, Vec::new());
    for _ in 0..10 {
        let outcomes: Vec<Attempt> =
            futures_util::stream::iter(0..200).map(|_| attempt(port)).buffer_unordered(50).collect().await;
        for o in outcomes {
            match o {
                Attempt::Connected(_) => connected += 1,
                Attempt::Http { status: 429, retry_after: Some(r) } if r == "1" => limited += 1,
                o => other.push(o),
            }
        }
        if limited > 0 {
            break;
        }
    }
    let spanned = started.elapsed().as_secs() + 2;
    assert!(other.is_empty(), "attempts neither connected nor refused with 429: {other:?}");
    assert!(limited > 0, "a connection flood from one address is refused with 429");
    assert!(connected <= PER_SECOND * spanned as usize, "{connected} connections accepted in {spanned} windows");
    let text = scrape(&http, server.metrics_port).await;
    let triggered = sum(&text, "sockudo_rate_limit_triggered_total", &[("limiter_type", "websocket_connect")]);
    assert_eq!(triggered, limited as f64);
    let recovered =
        eventually(Duration::from_secs(20), || probe(&http, port, "after-ip-flood").map(|r| r.is_ok())).await;
    assert!(recovered, "no fresh client got in within 20 s of the flood");
    server.stop().await;
}

/// How a churn cycle ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Ending {
    /// A close frame, then the server's reply and the end of the connection.
    Graceful,
    /// `SO_LINGER` 0, then close: the server gets a TCP reset.
    Reset,
    /// Subscribed, then silent: pings go unanswered until the server closes with 4201.
    PongTimeout,
}

/// One connect-subscribe-disconnect cycle. A quarter of them join a presence channel (a user of
/// their own), the rest one of a few public channels.
async fn churn_cycle(port: u16, i: usize, ending: Ending) -> Result<(), String> {
    let source = Ipv4Addr::new(127, 0, 0, 1 + (i % 4) as u8);
    let (mut ws, socket_id) = open(port, Some(source), false).await?;
    if i % 4 == 0 {
        let channel = format!("presence-churn-{}", i % 8);
        let (auth, data) = presence_auth(&socket_id, &channel, &format!("user-{i}"));
        subscribe(&mut ws, &channel, Some(auth), Some(data)).await?;
    } else {
        subscribe(&mut ws, &format!("churn-{}", i % 16), None, None).await?;
    }
    match ending {
        Ending::Graceful => {
            ws.close(None).await.map_err(|e| e.to_string())?;
            let rest = async { while let Some(Ok(_)) = ws.next().await {} };
            tokio::time::timeout(WAIT, rest).await.map_err(|_| "the server did not end the connection".to_owned())
        }
        Ending::Reset => {
            if let MaybeTlsStream::Plain(s) = ws.get_ref() {
                s.set_zero_linger().map_err(|e| e.to_string())?;
            }
            drop(ws);
            Ok(())
        }
        Ending::PongTimeout => {
            // Reads (so the close frame can arrive) but never answers a ping.
            let closed = async {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                        Some(Ok(_)) => {}
                        _ => return None,
                    }
                }
            };
            match tokio::time::timeout(Duration::from_secs(30), closed).await {
                Ok(Some(4201)) => Ok(()),
                other => Err(format!("expected a close with 4201, got {other:?}")),
            }
        }
    }
}

/// Runs `cycles` graceful and reset cycles (alternating) on `workers` tasks while `pong` pong-
/// timeout sockets go through a pool of `pool`; returns the failures.
async fn churn(port: u16, cycles: usize, workers: usize, pong: usize, pool: usize) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let next_pong = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (next, failures) = (next.clone(), failures.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cycles {
                    break;
                }
                let ending = if i % 2 == 0 { Ending::Graceful } else { Ending::Reset };
                if let Err(e) = churn_cycle(port, i, ending).await {
                    failures.lock().unwrap().push(format!("cycle {i} ({ending:?}): {e}"));
                }
            }
        });
    }
    for _ in 0..pool {
        let (next_pong, failures) = (next_pong.clone(), failures.clone());
        tasks.spawn(async move {
            loop {
                let i = next_pong.fetch_add(1, Ordering::Relaxed);
                if i >= pong {
                    break;
                }
                if let Err(e) = churn_cycle(port, i, Ending::PongTimeout).await {
                    failures.lock().unwrap().push(format!("pong-timeout socket {i}: {e}"));
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let f = failures.lock().unwrap().clone();
    f
}

/// Waits (bounded) until the node holds no connection, channel or presence member, and returns
/// its `/stats` then.
async fn drained(http: &reqwest::Client, metrics_port: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = stats(http, metrics_port).await;
        if n(&s, "connections") == 0 && n(&s, "channels") == 0 && n(&s, "presence_members") == 0 {
            return s;
        }
        assert!(Instant::now() < deadline, "the node did not drain within 20 s: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (bounded) until the node is drained and settled: tokio tasks and open descriptors
/// unchanged over a second of readings (the debounced `subscription_count` timers run on for a
/// moment after the last socket). The reading a baseline is taken from.
async fn quiescent(http: &reqwest::Client, metrics_port: u16) -> Value {
    let mut last = drained(http, metrics_port).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut steady = 0;
    while steady < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let s = stats(http, metrics_port).await;
        let same = ["tokio_tasks", "open_fds", "connections"].iter().all(|k| n(&s, k) == n(&last, k));
        steady = if same { steady + 1 } else { 0 };
        last = s;
    }
    last
}

/// 20,000 connect-subscribe-disconnect cycles, graceful and reset alternating, with 50 pong-
/// timeout sockets among them (activity timeout 2 s, pong timeout 1 s) and a quarter of the
/// cycles on presence channels: afterwards the node holds 0 connections, channels and presence
/// members, its task count and open file descriptors are back to the warm-up baseline exactly,
/// and its resident memory is within a stated bound of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_returns_the_node_to_its_baseline() {
    let _heavy = HEAVY.lock().await;
    const CYCLES: usize = 20_000;
    const PONG: usize = 50;
    let cfg = ConfigFile::new("churn", json!({"activity_timeout": 2, "pong_timeout": 1}));
    let server = Process::start_with_args(&["--config", &cfg.arg()], &[("LOG_LEVEL", "warn".into())]).await;
    // A fresh connection for each request: a pooled one would be an open descriptor (and a task)
    // in one reading and not in another.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let port = server.port;

    // Warm-up: the same mix at a smaller scale, with the pong-timeout pool full once, so that
    // lazily grown tables and buffers exist and the allocator has seen the run's peak.
    let failures = churn(port, 2_000, 16, 25, 25).await;
    assert!(failures.is_empty(), "warm-up: {failures:?}");
    let baseline = quiescent(&http, server.metrics_port).await;
    let timeouts_before = errors_of(&scrape(&http, server.metrics_port).await, "pong_timeout");

    let started = Instant::now();
    let failures = churn(port, CYCLES, 16, PONG, 25).await;
    let seconds = started.elapsed().as_secs_f64();
    assert!(failures.is_empty(), "{} failed cycles, first: {:?}", failures.len(), failures.first());
    let timeouts = errors_of(&scrape(&http, server.metrics_port).await, "pong_timeout") - timeouts_before;
    assert_eq!(timeouts, PONG as f64, "each pong-timeout socket is counted once, and no other socket timed out");

    drained(&http, server.metrics_port).await;
    // Tasks and descriptors of closed sockets go a moment after the counts do (and so do those
    // of the previous `/stats` request).
    let deadline = Instant::now() + Duration::from_secs(15);
    let end = loop {
        let s = stats(&http, server.metrics_port).await;
        let back = ["tokio_tasks", "open_fds"].iter().all(|k| n(&s, k) == n(&baseline, k));
        if back || Instant::now() >= deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(n(&end, "tokio_tasks"), n(&baseline, "tokio_tasks"), "tokio tasks: baseline {baseline}, end {end}");
    assert_eq!(n(&end, "open_fds"), n(&baseline, "open_fds"), "open fds: baseline {baseline}, end {end}");
    // At this scale the allocator's retained pages are a larger share of the total than after a
    // million cycles, so the bound is 10% of the baseline plus 8 MiB for them.
    let (rss0, rss1) = (n(&baseline, "rss_bytes"), n(&end, "rss_bytes"));
    let bound = rss0 + rss0 / 10 + 8 * 1024 * 1024;
    eprintln!(
        "churn: {CYCLES} cycles + {PONG} pong timeouts in {seconds:.1} s ({:.0}/s); tasks {} -> {}, fds {} -> {}, RSS {} -> {} KiB (bound {} KiB)",
        CYCLES as f64 / seconds,
        n(&baseline, "tokio_tasks"),
        n(&end, "tokio_tasks"),
        n(&baseline, "open_fds"),
        n(&end, "open_fds"),
        rss0 >> 10,
        rss1 >> 10,
        bound >> 10
    );
    assert!(rss1 <= bound, "RSS {rss1} B after churn, above {bound} B (baseline {rss0} B)");
    server.stop().await;
}

/// What the soak asks of one connection's task.
enum Cmd {
    /// Subscribe (as this user on a presence channel); answered once the server acknowledged.
    Subscribe {
        channel: String,
        user: String,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Unsubscribe, then `pusher:ping`: the server handles a socket's messages in order, so its
    /// `pusher:pong` says the unsubscription was processed (it has no acknowledgement of its own).
    Unsubscribe {
        channel: String,
        done: oneshot::Sender<Result<(), String>>,
    },
    Close {
        reset: bool,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// One soak connection: runs commands and answers pings in between.
async fn soak_peer(mut ws: Ws, socket_id: String, mut rx: mpsc::Receiver<Cmd>) {
    loop {
        tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(Cmd::Subscribe { channel, user, done }) => {
                    let (auth, data) = if channel.starts_with("presence-") {
                        let (a, d) = presence_auth(&socket_id, &channel, &user);
                        (Some(a), Some(d))
                    } else if channel.starts_with("private-") {
                        (Some(format!("{KEY}:{}", sockudo::auth::sign(SECRET, &format!("{socket_id}:{channel}")))), None)
                    } else {
                        (None, None)
                    };
                    let _ = done.send(subscribe(&mut ws, &channel, auth, data).await);
                }
                Some(Cmd::Unsubscribe { channel, done }) => {
                    let r = async {
                        let unsub = json!({"event": "pusher:unsubscribe", "data": {"channel": channel}});
                        ws.send(Message::text(unsub.to_string())).await.map_err(|e| e.to_string())?;
                        ws.send(Message::text(r#"{"event":"pusher:ping","data":{}}"#)).await.map_err(|e| e.to_string())?;
                        wait_for(&mut ws, |f| f["event"] == "pusher:pong", WAIT * 2).await.map(|_| ())
                    };
                    let _ = done.send(r.await);
                }
                Some(Cmd::Close { reset: true, done }) => {
                    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
                        let _ = s.set_zero_linger();
                    }
                    drop(ws);
                    let _ = done.send(Ok(()));
                    return;
                }
                Some(Cmd::Close { reset: false, done }) => {
                    let r = async {
                        ws.close(None).await.map_err(|e| e.to_string())?;
                        let rest = async { while let Some(Ok(_)) = ws.next().await {} };
                        tokio::time::timeout(WAIT, rest).await.map_err(|_| "the server did not end the connection".to_owned())
                    };
                    let _ = done.send(r.await);
                    return;
                }
                None => return,
            },
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) if t.as_str().contains(r#""event":"pusher:ping""#) => {
                    let _ = ws.send(pong()).await;
                }
                Some(Ok(_)) => {}
                // Closed by the server: the commands that follow fail, and the soak says so.
                _ => return,
            },
        }
    }
}

/// The soak's model of the node: which connections are open and what each is subscribed to.
#[derive(Default)]
struct Population {
    peers: BTreeMap<u64, Peer>,
    next_id: u64,
}

/// An open connection of the soak.
struct Peer {
    tx: mpsc::Sender<Cmd>,
    /// Channel → the presence user it joined as (any string on other channels).
    subs: BTreeMap<String, String>,
    /// A command is in flight.
    busy: bool,
}

impl Population {
    /// Connections, occupied channels and presence members (one per user per channel).
    fn expected(&self) -> (u64, u64, u64) {
        let mut channels = BTreeMap::<&str, BTreeSet<&str>>::new();
        for Peer { subs, .. } in self.peers.values() {
            for (channel, user) in subs {
                channels.entry(channel).or_default().insert(user);
            }
        }
        let members = channels.iter().filter(|(c, _)| c.starts_with("presence-")).map(|(_, u)| u.len() as u64).sum();
        (self.peers.len() as u64, channels.len() as u64, members)
    }

    fn idle(&self, want: impl Fn(&BTreeMap<String, String>) -> bool) -> Option<u64> {
        let ids: Vec<u64> = self.peers.iter().filter(|(_, p)| !p.busy && want(&p.subs)).map(|(id, _)| *id).collect();
        (!ids.is_empty()).then(|| ids[fastrand::usize(..ids.len())])
    }
}

/// What a finished soak operation changes in the model.
enum Done {
    Opened(Result<(mpsc::Sender<Cmd>, String), String>),
    Subscribed(u64, String, String, Result<(), String>),
    Unsubscribed(u64, String, Result<(), String>),
    Closed(u64, Result<(), String>),
}

/// A soak: for `seconds`, random opens, closes (graceful and reset), subscribes and
/// unsubscribes (public, private and presence channels) over a population of 10 to 60
/// connections, 8 operations in flight; every 5 s the operations settle and `/stats` must reach
/// the counts the test knows (bounded wait: closes finish on the server a moment after the
/// client saw them), then `sockudo_connected` and the sum of `sockudo_active_channels` must
/// equal them too. Returns (checkpoints, operations, failures, mismatches).
async fn soak(port: u16, metrics_port: u16, seconds: u64) -> (usize, u64, Vec<String>, Vec<String>) {
    let http = reqwest::Client::new();
    let mut pop = Population::default();
    let mut tasks: tokio::task::JoinSet<Done> = tokio::task::JoinSet::new();
    let (mut checkpoints, mut ops) = (0usize, 0u64);
    let (mut failures, mut mismatches) = (Vec::new(), Vec::new());
    let started = Instant::now();
    let mut next_checkpoint = started + Duration::from_secs(5);
    let end = started + Duration::from_secs(seconds);
    loop {
        let now = Instant::now();
        let last = now >= end;
        if now >= next_checkpoint || last {
            if last {
                // The end: every connection closes, and the node must come back to zero.
                for (id, peer) in pop.peers.iter_mut() {
                    if !peer.busy {
                        peer.busy = true;
                        let (done, rx) = oneshot::channel();
                        let _ = peer.tx.send(Cmd::Close { reset: id % 2 == 0, done }).await;
                        let id = *id;
                        tasks.spawn(async move { Done::Closed(id, rx.await.unwrap_or(Err("peer gone".into()))) });
                    }
                }
            }
            while let Some(done) = tasks.join_next().await {
                apply(&mut pop, done.expect("soak op"), &mut failures);
                ops += 1;
            }
            if last && !pop.peers.is_empty() {
                continue;
            }
            checkpoints += 1;
            let want = pop.expected();
            let deadline = Instant::now() + Duration::from_secs(10);
            let got = loop {
                let s = stats(&http, metrics_port).await;
                let got = (n(&s, "connections"), n(&s, "channels"), n(&s, "presence_members"));
                if got == want || Instant::now() >= deadline {
                    break got;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if got != want {
                mismatches.push(format!("checkpoint {checkpoints}: /stats {got:?}, the test counts {want:?}"));
            }
            let text = scrape(&http, metrics_port).await;
            let gauges =
                (sum(&text, "sockudo_connected", &[]) as u64, sum(&text, "sockudo_active_channels", &[]) as u64);
            if gauges != (want.0, want.1) {
                mismatches.push(format!(
                    "checkpoint {checkpoints}: gauges {gauges:?}, the test counts {:?}",
                    (want.0, want.1)
                ));
            }
            if last {
                return (checkpoints, ops, failures, mismatches);
            }
            next_checkpoint = Instant::now() + Duration::from_secs(5);
        }
        if tasks.len() >= 8 {
            if let Some(done) = tasks.join_next().await {
                apply(&mut pop, done.expect("soak op"), &mut failures);
                ops += 1;
            }
            continue;
        }
        let live = pop.peers.len();
        let roll = fastrand::u32(..100);
        if live < 10 || (live < 60 && roll < 20) {
            tasks.spawn(async move {
                Done::Opened(open(port, None, false).await.map(|(ws, id)| {
                    let (tx, rx) = mpsc::channel(4);
                    tokio::spawn(soak_peer(ws, id.clone(), rx));
                    (tx, id)
                }))
            });
        } else if live > 60 || roll < 35 {
            if let Some(id) = pop.idle(|_| true) {
                let peer = pop.peers.get_mut(&id).unwrap();
                peer.busy = true;
                let (done, rx) = oneshot::channel();
                let _ = peer.tx.send(Cmd::Close { reset: roll % 2 == 0, done }).await;
                tasks.spawn(async move { Done::Closed(id, rx.await.unwrap_or(Err("peer gone".into()))) });
            }
        } else if roll < 75 {
            let channel = match fastrand::u32(..4) {
                0 => format!("presence-soak-{}", fastrand::u32(..4)),
                1 => format!("private-soak-{}", fastrand::u32(..4)),
                _ => format!("soak-{}", fastrand::u32(..8)),
            };
            if let Some(id) = pop.idle(|subs| !subs.contains_key(&channel)) {
                let peer = pop.peers.get_mut(&id).unwrap();
                peer.busy = true;
                let user = format!("user-{}", fastrand::u32(..6));
                let (done, rx) = oneshot::channel();
                let _ = peer.tx.send(Cmd::Subscribe { channel: channel.clone(), user: user.clone(), done }).await;
                tasks.spawn(
                    async move { Done::Subscribed(id, channel, user, rx.await.unwrap_or(Err("peer gone".into()))) },
                );
            }
        } else if let Some(id) = pop.idle(|subs| !subs.is_empty()) {
            let peer = pop.peers.get_mut(&id).unwrap();
            peer.busy = true;
            let channel = peer.subs.keys().nth(fastrand::usize(..peer.subs.len())).unwrap().clone();
            let (done, rx) = oneshot::channel();
            let _ = peer.tx.send(Cmd::Unsubscribe { channel: channel.clone(), done }).await;
            tasks.spawn(async move { Done::Unsubscribed(id, channel, rx.await.unwrap_or(Err("peer gone".into()))) });
        }
    }
}

/// Applies a finished operation to the model; a failed one is recorded (and a connection
/// whose command failed is dropped from the model, since its state is unknown).
fn apply(pop: &mut Population, done: Done, failures: &mut Vec<String>) {
    match done {
        Done::Opened(Ok((tx, _))) => {
            pop.next_id += 1;
            pop.peers.insert(pop.next_id, Peer { tx, subs: BTreeMap::new(), busy: false });
        }
        Done::Opened(Err(e)) => failures.push(format!("open: {e}")),
        Done::Subscribed(id, channel, user, r) => {
            if let Some(p) = pop.peers.get_mut(&id) {
                p.busy = false;
                match r {
                    Ok(()) => {
                        p.subs.insert(channel, user);
                    }
                    Err(e) => failures.push(format!("subscribe {channel}: {e}")),
                }
            }
        }
        Done::Unsubscribed(id, channel, r) => {
            if let Some(p) = pop.peers.get_mut(&id) {
                p.busy = false;
                p.subs.remove(&channel);
                if let Err(e) = r {
                    failures.push(format!("unsubscribe {channel}: {e}"));
                }
            }
        }
        Done::Closed(id, r) => {
            pop.peers.remove(&id);
            if let Err(e) = r {
                failures.push(format!("close: {e}"));
            }
        }
    }
}

/// A 20-second soak with the checks of `soak`: no failed operation, no mismatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_gauges_equal_the_true_counts_at_every_checkpoint() {
    let _heavy = HEAVY.lock().await;
    let server = Process::start(&[("LOG_LEVEL", "warn".into())]).await;
    let (checkpoints, ops, failures, mismatches) = soak(server.port, server.metrics_port, 20).await;
    eprintln!(
        "soak: {ops} operations, {checkpoints} checkpoints, {} failures, {} mismatches",
        failures.len(),
        mismatches.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(mismatches.is_empty(), "{mismatches:?}");
    // One or more during the run (every 5 s, after the previous one settled) and one at the end.
    assert!(checkpoints >= 2, "{checkpoints} checkpoints");
    server.stop().await;
}
