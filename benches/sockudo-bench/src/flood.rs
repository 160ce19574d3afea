//! Flood: connection attempts and publishes at a multiple (`--multiple`, 2 by default) of the
//! saturation rates the operator measured (`--connect-rate`, `--publish-rate`) for T seconds.
//! Every outcome is counted by its code: connected, refused on the socket with a Pusher code
//! (4100 over capacity, ...), refused at the upgrade with an HTTP status (429, 503), connect
//! errors; publishes by status (200, 429, 503, ...). Connected sockets are held (answering
//! pings) until the flood ends, so that the connection limit is reached. Afterwards a probe
//! (connect, subscribe, publish, receive) runs every 200 ms until it succeeds: the recovery
//! time. With `--server-pid` the server process is checked to be alive throughout. A flood
//! fails when the server died or did not recover within `--recovery-timeout`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::churn;
use crate::pusher::{self, PublishOutcome, Publisher, Target, Ws};
use crate::report::{self, progress};
use crate::sys;

#[derive(Debug, Clone, Serialize)]
pub struct FloodParams {
    /// Connection attempts per second at the measured saturation point (0: no connection flood).
    pub connect_rate: f64,
    /// Publishes per second at the measured saturation point (0: no publish flood).
    pub publish_rate: f64,
    /// The flood's rates are these multiples of the saturation rates.
    pub multiple: f64,
    pub duration_seconds: f64,
    /// Subscribers connected before the flood, on the channel the flood publishes to.
    pub subscribers: usize,
    /// Connected flood sockets held open at most (the rest are closed at once).
    pub max_held: usize,
    /// Connection attempts, and separately publishes, in flight at most; beyond it the tool
    /// skips (and counts) the attempt rather than fall behind without saying so.
    pub max_inflight: usize,
    pub recovery_timeout_seconds: f64,
    pub source_addrs: usize,
}

/// The `flood` scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FloodReport {
    pub scenario: &'static str,
    pub server: String,
    pub params: FloodParams,
    pub seconds: f64,
    /// Connection attempts by outcome: `connected`, `close_4100` (a Pusher code on the socket),
    /// `http_429`, `http_503` (an HTTP status at the upgrade), `connect_error`, `skipped`.
    pub connections: BTreeMap<String, u64>,
    pub connect_attempts_per_second: f64,
    /// Publishes by outcome: `200`, `429`, `503`, other statuses, `transport_error`, `skipped`.
    pub publishes: BTreeMap<String, u64>,
    pub publishes_per_second: f64,
    pub first_connect_error: Option<String>,
    /// Subscribers still connected at the end, events they received, and how the others ended.
    pub subscribers_connected: usize,
    pub subscriber_deliveries: u64,
    pub subscriber_closes: BTreeMap<String, u64>,
    /// Seconds from the end of the flood until a fresh client connected, subscribed and
    /// received a publish; `None` if it did not within the recovery timeout.
    pub recovery_seconds: Option<f64>,
    pub recovery_attempts: u64,
    pub last_probe_error: Option<String>,
    /// `None` without `--server-pid`.
    pub server_alive: Option<bool>,
    pub server_cpu_seconds: Option<f64>,
    pub rss_before_kb: Option<u64>,
    pub rss_peak_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
}

impl FloodReport {
    pub fn passed(&self) -> bool {
        self.server_alive != Some(false) && self.recovery_seconds.is_some()
    }

    pub fn print(&self) {
        let p = &self.params;
        let mut t = report::Table::new(
            format!(
                "flood: {:.1}x of {:.0} connects/s and {:.0} publishes/s for {:.0} s, against {}",
                p.multiple, p.connect_rate, p.publish_rate, p.duration_seconds, self.server
            ),
            &["figure", "value"],
        );
        t.kv("connection attempts/s", format!("{:.0}", self.connect_attempts_per_second));
        t.kv("connection outcomes", format!("{:?}", self.connections));
        t.kv("publishes/s", format!("{:.0}", self.publishes_per_second));
        t.kv("publish outcomes", format!("{:?}", self.publishes));
        t.kv(
            "subscribers connected / deliveries / closes",
            format!("{} / {} / {:?}", self.subscribers_connected, self.subscriber_deliveries, self.subscriber_closes),
        );
        t.kv(
            "recovery",
            match self.recovery_seconds {
                Some(s) => format!("{s:.2} s ({} probes)", self.recovery_attempts),
                None => format!("none within {:.0} s: {:?}", p.recovery_timeout_seconds, self.last_probe_error),
            },
        );
        t.kv(
            "server alive",
            match self.server_alive {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "n/a (no --server-pid)",
            },
        );
        let kb = |v: Option<u64>| v.map(|x| format!("{x} KB")).unwrap_or_else(|| "n/a".to_owned());
        t.kv(
            "server RSS before / peak / after",
            format!("{} / {} / {}", kb(self.rss_before_kb), kb(self.rss_peak_kb), kb(self.rss_after_kb)),
        );
        t.kv("server CPU s", report::opt(self.server_cpu_seconds, 2));
        if let Some(e) = &self.first_connect_error {
            t.kv("first connect error", e);
        }
        t.kv("result", if self.passed() { "pass" } else { "FAIL" });
        t.print();
    }

    pub fn markdown(&self) -> (String, String) {
        let p = &self.params;
        let params = format!(
            "{:.1}x of {:.0} connects/s and {:.0} publishes/s, {:.0} s",
            p.multiple, p.connect_rate, p.publish_rate, p.duration_seconds
        );
        let result = format!(
            "connections {:?}; publishes {:?}; recovery {}; server alive {}",
            self.connections,
            self.publishes,
            self.recovery_seconds.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "none".into()),
            self.server_alive.map(|a| if a { "yes" } else { "NO" }).unwrap_or("n/a"),
        );
        (params, result)
    }
}

/// Counters shared by the flood's tasks.
#[derive(Default)]
struct Tally {
    connections: Mutex<BTreeMap<String, u64>>,
    publishes: Mutex<BTreeMap<String, u64>>,
    first_connect_error: Mutex<Option<String>>,
    held: AtomicUsize,
    connects_inflight: AtomicUsize,
    publishes_inflight: AtomicUsize,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: impl Into<String>) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key.into()).or_default() += 1;
    }
}

/// How one connection attempt ended.
enum Attempt {
    Connected(Box<Ws>),
    /// `pusher:error` and/or a close frame with this code.
    Refused(u16),
    /// The upgrade was answered with this HTTP status.
    Http(u16),
    Error(String),
}

async fn attempt(target: &Target, source: Option<IpAddr>) -> Attempt {
    let stream = match churn::tcp(target, source, None).await {
        Ok(s) => s,
        Err(f) => return Attempt::Error(f.to_string()),
    };
    let handshake =
        tokio_tungstenite::client_async_with_config(target.ws_url(), stream, Some(pusher::ws_config(false)));
    let mut ws = match tokio::time::timeout(target.timeout, handshake).await {
        Err(_) => return Attempt::Error("ws_handshake: timed out".into()),
        Ok(Err(tungstenite::Error::Http(resp))) => return Attempt::Http(resp.status().as_u16()),
        Ok(Err(e)) => return Attempt::Error(format!("ws_handshake: {e}")),
        Ok(Ok((ws, _))) => ws,
    };
    let read = async {
        let mut code = None;
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Text(t)) => {
                    let Some(f) = pusher::Frame::parse(t.as_str()) else { continue };
                    match f.event {
                        "pusher:connection_established" => return Ok(true),
                        "pusher:error" => {
                            let data: serde_json::Value =
                                f.data.and_then(|d| serde_json::from_str(d.get()).ok()).unwrap_or_default();
                            code = data["code"].as_u64().and_then(|c| u16::try_from(c).ok());
                        }
                        _ => {}
                    }
                }
                Ok(Message::Close(Some(c))) => return Err(Some(u16::from(c.code))),
                Ok(Message::Close(None)) => return Err(code),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Err(code)
    };
    match tokio::time::timeout(target.timeout, read).await {
        Ok(Ok(_)) => Attempt::Connected(Box::new(ws)),
        Ok(Err(Some(code))) => Attempt::Refused(code),
        Ok(Err(None)) => Attempt::Error("connection_established: closed without a code".into()),
        Err(_) => Attempt::Error("connection_established: timed out".into()),
    }
}

/// Resolves once the flood has ended.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Holds a connected socket, answering pings, until the flood ends; then resets it.
async fn hold(mut ws: Ws, mut stop: watch::Receiver<bool>, tally: Arc<Tally>) {
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if pusher::Frame::parse(t.as_str()).is_some_and(|f| f.event == "pusher:ping") {
                        let _ = ws.send(pusher::pong()).await;
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            },
        }
    }
    tally.held.fetch_sub(1, Relaxed);
    churn::reset(ws);
}

/// A subscriber of the flooded channel: counts deliveries until the end, or how it was closed.
async fn subscriber(mut ws: Ws, mut stop: watch::Receiver<bool>, delivered: Arc<AtomicU64>) -> Option<String> {
    let closed = loop {
        tokio::select! {
            _ = stopped(&mut stop) => break None,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => match pusher::Frame::parse(t.as_str()).map(|f| f.event) {
                    Some("bench") => { delivered.fetch_add(1, Relaxed); }
                    Some("pusher:ping") => { let _ = ws.send(pusher::pong()).await; }
                    _ => {}
                },
                Some(Ok(Message::Close(c))) => break Some(c.map(|c| format!("close_{}", u16::from(c.code))).unwrap_or_else(|| "close".into())),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break Some("connection_lost".into()),
            },
        }
    };
    if closed.is_none() {
        churn::reset(ws);
    }
    closed
}

/// One recovery probe: a fresh client connects, subscribes, and receives a publish.
async fn probe(target: &Target, publisher: &Publisher, channel: &str) -> Result<(), String> {
    let (mut ws, _) = churn::connect(target, None).await.map_err(|f| f.to_string())?;
    pusher::subscribe(&mut ws, channel, target.timeout).await.map_err(|f| f.to_string())?;
    match publisher.publish(channel, "probe").await {
        PublishOutcome::Ok => {}
        PublishOutcome::Status(s) => return Err(format!("publish: HTTP {s}")),
        PublishOutcome::Transport(e) => return Err(format!("publish: {e}")),
    }
    let got = pusher::wait_event(&mut ws, "bench", Some(channel), target.timeout, pusher::Stage::Subscribe).await;
    churn::reset(ws);
    got.map_err(|f| f.to_string())
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().chars().next()))
        .flatten()
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Runs the `flood` scenario.
pub async fn run(target: &Target, params: FloodParams, server_pid: Option<u32>) -> Result<FloodReport, String> {
    let pid = server_pid.map(|p| p.to_string());
    let rss = || pid.as_deref().and_then(sys::rss_kb);
    let run_id = format!("{}-{}", std::process::id(), sys::now_nanos() % 1_000_000);
    let channel = format!("flood-{run_id}");
    let tally = Arc::new(Tally::default());
    let (stop_tx, stop) = watch::channel(false);

    // The subscribers, before the flood.
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subscribers = JoinSet::new();
    for i in 0..params.subscribers {
        let source = target.source_for(i, params.source_addrs);
        let (mut ws, _) = churn::connect(target, source).await.map_err(|f| format!("subscriber {i}: {f}"))?;
        pusher::subscribe(&mut ws, &channel, target.timeout).await.map_err(|f| format!("subscriber {i}: {f}"))?;
        subscribers.spawn(subscriber(ws, stop.clone(), delivered.clone()));
    }

    let connect_rate = params.connect_rate * params.multiple;
    let publish_rate = params.publish_rate * params.multiple;
    let max_inflight = params.max_inflight.max(1);
    let publisher = Publisher::new(target, max_inflight.min(256))?;
    let rss_before = rss();
    let mut rss_peak = rss_before;
    let cpu = sys::CpuMeter::start(server_pid);
    let mut server_alive = pid.as_deref().map(alive);
    let started = Instant::now();
    let duration = sys::secs(params.duration_seconds);
    let (mut launched_connects, mut launched_publishes) = (0u64, 0u64);
    let mut work = JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_progress = Instant::now();
    // Launch on a fixed schedule: every 10 ms, whatever the schedule says is due by now.
    while started.elapsed() < duration {
        tick.tick().await;
        let t = started.elapsed().as_secs_f64().min(duration.as_secs_f64());
        while (launched_connects as f64) < connect_rate * t {
            launched_connects += 1;
            if tally.connects_inflight.load(Relaxed) >= max_inflight {
                bump(&tally.connections, "skipped");
                continue;
            }
            tally.connects_inflight.fetch_add(1, Relaxed);
            let (target, tally, stop, n) = (target.clone(), tally.clone(), stop.clone(), launched_connects);
            let (max_held, sources) = (params.max_held, params.source_addrs);
            work.spawn(async move {
                let outcome = attempt(&target, target.source_for(n as usize, sources)).await;
                tally.connects_inflight.fetch_sub(1, Relaxed);
                match outcome {
                    Attempt::Connected(ws) => {
                        bump(&tally.connections, "connected");
                        if tally.held.fetch_add(1, Relaxed) < max_held {
                            tokio::spawn(hold(*ws, stop, tally.clone()));
                        } else {
                            tally.held.fetch_sub(1, Relaxed);
                            churn::reset(*ws);
                        }
                    }
                    Attempt::Refused(code) => bump(&tally.connections, format!("close_{code}")),
                    Attempt::Http(status) => bump(&tally.connections, format!("http_{status}")),
                    Attempt::Error(e) => {
                        bump(&tally.connections, "connect_error");
                        if let Ok(mut f) = tally.first_connect_error.lock() {
                            f.get_or_insert(e);
                        }
                    }
                }
            });
        }
        while (launched_publishes as f64) < publish_rate * t {
            launched_publishes += 1;
            if tally.publishes_inflight.load(Relaxed) >= max_inflight {
                bump(&tally.publishes, "skipped");
                continue;
            }
            tally.publishes_inflight.fetch_add(1, Relaxed);
            let (publisher, tally, channel, n) =
                (publisher.clone(), tally.clone(), channel.clone(), launched_publishes);
            work.spawn(async move {
                let outcome = publisher.publish(&channel, &n.to_string()).await;
                tally.publishes_inflight.fetch_sub(1, Relaxed);
                match outcome {
                    PublishOutcome::Ok => bump(&tally.publishes, "200"),
                    PublishOutcome::Status(s) => bump(&tally.publishes, s.to_string()),
                    PublishOutcome::Transport(_) => bump(&tally.publishes, "transport_error"),
                }
            });
        }
        // Finished tasks are collected as they go, so the set stays small.
        while work.try_join_next().is_some() {}
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            if let Some(p) = pid.as_deref() {
                server_alive = Some(server_alive.unwrap_or(true) && alive(p));
                rss_peak = rss_peak.max(sys::rss_kb(p));
            }
            progress(&format!(
                "[flood] {:>4.0}s connects={launched_connects} held={} publishes={launched_publishes} connections={:?} publishes={:?}",
                started.elapsed().as_secs_f64(),
                tally.held.load(Relaxed),
                tally.connections.lock().map(|m| m.clone()).unwrap_or_default(),
                tally.publishes.lock().map(|m| m.clone()).unwrap_or_default(),
            ));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    // The flood ends: held sockets go, and the probe starts at once; attempts and publishes
    // still in flight finish within their own timeouts meanwhile.
    let _ = stop_tx.send(true);
    let flood_end = Instant::now();
    let probe_publisher = Publisher::new(target, 1)?;
    let recovery_timeout = sys::secs(params.recovery_timeout_seconds);
    let (mut recovery_seconds, mut recovery_attempts, mut last_probe_error) = (None, 0u64, None);
    while flood_end.elapsed() < recovery_timeout {
        recovery_attempts += 1;
        let probe_channel = format!("flood-probe-{run_id}-{recovery_attempts}");
        match probe(target, &probe_publisher, &probe_channel).await {
            Ok(()) => {
                recovery_seconds = Some(flood_end.elapsed().as_secs_f64());
                break;
            }
            Err(e) => last_probe_error = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drain = tokio::time::timeout(target.timeout * 4 + Duration::from_secs(10), async {
        while work.join_next().await.is_some() {}
    });
    if drain.await.is_err() {
        work.abort_all();
    }
    let mut subscriber_closes = BTreeMap::new();
    let mut subscribers_connected = 0;
    while let Some(r) = subscribers.join_next().await {
        match r {
            Ok(None) => subscribers_connected += 1,
            Ok(Some(how)) => *subscriber_closes.entry(how).or_default() += 1,
            Err(_) => *subscriber_closes.entry("task_failed".to_owned()).or_default() += 1,
        }
    }
    let cpu_use = cpu.stop();
    if let Some(p) = pid.as_deref() {
        server_alive = Some(server_alive.unwrap_or(true) && alive(p));
    }
    let rss_after = rss();
    let connections = tally.connections.lock().map(|m| m.clone()).unwrap_or_default();
    let publishes = tally.publishes.lock().map(|m| m.clone()).unwrap_or_default();
    let first_connect_error = tally.first_connect_error.lock().ok().and_then(|f| f.clone());
    Ok(FloodReport {
        scenario: "flood",
        server: format!("{}:{}", target.host, target.port),
        seconds,
        connect_attempts_per_second: launched_connects as f64 / seconds.max(1e-9),
        connections,
        publishes_per_second: launched_publishes as f64 / seconds.max(1e-9),
        publishes,
        first_connect_error,
        subscribers_connected,
        subscriber_deliveries: delivered.load(Relaxed),
        subscriber_closes,
        recovery_seconds,
        recovery_attempts,
        last_probe_error,
        server_alive,
        server_cpu_seconds: cpu_use.server_cpu_seconds,
        rss_before_kb: rss_before,
        rss_peak_kb: rss_peak.max(rss_after),
        rss_after_kb: rss_after,
        params,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive() {
        assert!(alive(&std::process::id().to_string()));
        assert!(!alive("0"));
    }
}
