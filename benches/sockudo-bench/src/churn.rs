//! Churn: W concurrent workers, each looping connect → subscribe → (unsubscribe → subscribe)
//! × M → disconnect, for T seconds or for N cycles; reports full cycles per second, subscribe
//! and unsubscribe operations per second, failures by stage, cycle time percentiles, and the
//! server's CPU and resident memory before and after (given `--server-pid`).
//!
//! `--mix` chooses how cycles end: a graceful close (close frame, then the server ends the
//! connection), an abrupt reset (`SO_LINGER` 0, then close: the server gets a TCP RST), or a
//! pong timeout (subscribe, then never answer the server's pings until it closes with 4201;
//! these last `activity_timeout` + `pong_timeout`, so they run in a bounded pool of their own
//! while the others churn). `--presence` sends a share of the cycles to presence channels with
//! signed auth. With `--metrics-port` (sockudo only) the run starts with a warm-up, takes the
//! server's `/stats` as the baseline, and ends by checking that connections, channels and
//! presence members are back to 0 and tokio tasks, open file descriptors and RSS back to the
//! baseline; each check prints pass or fail, and a failed one fails the run.
//!
//! Also the client pieces the flood and soak scenarios share: [`connect`] (which keeps the
//! socket id for signed subscriptions), [`subscribe_with`], [`channel_auth`] and [`reset`].

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::pusher::{self, Failure, Stage, Target, Ws};
use crate::report::{self, progress, Latency};
use crate::soak::{self, Stats};
use crate::sys;

/// How the cycles end, as relative weights (`--mix graceful=60,reset=39,pong=1`).
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Mix {
    pub graceful: u32,
    pub reset: u32,
    pub pong: u32,
}

impl Mix {
    fn total(&self) -> u32 {
        self.graceful + self.reset + self.pong
    }
}

/// Parses `graceful=W,reset=W,pong=W` (any subset; missing kinds weigh 0).
pub fn parse_mix(s: &str) -> Result<Mix, String> {
    let mut mix = Mix { graceful: 0, reset: 0, pong: 0 };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (kind, weight) = part.split_once('=').unwrap_or((part, "1"));
        let weight: u32 = weight.trim().parse().map_err(|_| format!("{part:?}: the weight is not a whole number"))?;
        match kind.trim() {
            "graceful" => mix.graceful = weight,
            "reset" => mix.reset = weight,
            "pong" | "pong-timeout" => mix.pong = weight,
            other => return Err(format!("{other:?} is not graceful, reset or pong")),
        }
    }
    if mix.total() == 0 {
        return Err("the mix needs a weight above 0".into());
    }
    Ok(mix)
}

#[derive(Debug, Clone, Serialize)]
pub struct ChurnParams {
    pub workers: usize,
    pub duration_seconds: f64,
    /// Stop after this many cycles instead of after `duration_seconds`.
    pub cycles: Option<u64>,
    /// Unsubscribe/resubscribe rounds per connection (graceful and reset cycles).
    pub resubscribes: usize,
    pub channels: usize,
    pub source_addrs: usize,
    pub mix: Mix,
    /// Percentage of cycles that join a presence channel (as a user of their own).
    pub presence_percent: u32,
    /// Pong-timeout sockets held at a time.
    pub pong_pool: usize,
    /// Cycles of the warm-up before the baseline (only with `metrics_port`).
    pub warmup_cycles: u64,
    /// The server's metrics port, for `/stats` (sockudo only): enables the end-state checks.
    pub metrics_port: Option<u16>,
    /// Longest wait, in seconds, for the server to drain and its tasks and descriptors to return.
    pub settle_seconds: f64,
}

/// One end-state check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

/// The `churn` scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ChurnReport {
    pub scenario: &'static str,
    pub server: String,
    pub params: ChurnParams,
    pub seconds: f64,
    pub cycles: u64,
    pub cycles_per_second: f64,
    /// Completed cycles by how they ended: `graceful`, `reset`, `pong_timeout`.
    pub cycles_by_ending: BTreeMap<String, u64>,
    pub presence_cycles: u64,
    pub subscribes_per_second: f64,
    pub unsubscribes_per_second: f64,
    pub failures: BTreeMap<String, u64>,
    pub first_failure: Option<String>,
    /// One whole graceful or reset cycle (connect to closed).
    pub cycle_latency: Latency,
    /// TCP connect to `pusher:connection_established`.
    pub connect_latency: Latency,
    pub server_cpu_seconds: Option<f64>,
    pub server_cpu_ms_per_cycle: Option<f64>,
    pub cpu: sys::CpuUse,
    pub rss_before_kb: Option<u64>,
    pub rss_after_kb: Option<u64>,
    /// The server's `/stats` after the warm-up and at the end (with `--metrics-port`).
    pub baseline: Option<Stats>,
    pub end: Option<Stats>,
    pub checks: Vec<Check>,
    /// The first run was disturbed by other processes (see `--quiet-below`) and run again.
    pub repeated_for_other_load: bool,
}

impl ChurnReport {
    /// Whether every end-state check passed (true when there were none).
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
    }

    pub fn print(&self) {
        let what = match self.params.cycles {
            Some(n) => format!("{n} cycles"),
            None => format!("{:.0} s", self.params.duration_seconds),
        };
        let mut t = report::Table::new(
            format!(
                "churn: {} workers for {what}, mix {}, {}% presence, {} resubscribe(s) per connection, against {}",
                self.params.workers,
                mix_text(&self.params.mix),
                self.params.presence_percent,
                self.params.resubscribes,
                self.server
            ),
            &["figure", "value"],
        );
        t.kv("cycles", format!("{} {:?}", self.cycles, self.cycles_by_ending));
        t.kv("presence cycles", self.presence_cycles);
        t.kv("connect/disconnect cycles/s", format!("{:.1}", self.cycles_per_second));
        t.kv("subscribes/s", format!("{:.1}", self.subscribes_per_second));
        t.kv("unsubscribes/s", format!("{:.1}", self.unsubscribes_per_second));
        t.kv("failures", format!("{} {:?}", self.failures.values().sum::<u64>(), self.failures));
        t.kv(
            "cycle p50 / p99 / max ms",
            format!(
                "{:.2} / {:.2} / {:.2}",
                self.cycle_latency.p50_ms, self.cycle_latency.p99_ms, self.cycle_latency.max_ms
            ),
        );
        t.kv(
            "connect p50 / p99 / max ms",
            format!(
                "{:.2} / {:.2} / {:.2}",
                self.connect_latency.p50_ms, self.connect_latency.p99_ms, self.connect_latency.max_ms
            ),
        );
        t.kv(
            "server CPU s (ms per cycle)",
            format!("{} ({})", report::opt(self.server_cpu_seconds, 2), report::opt(self.server_cpu_ms_per_cycle, 3)),
        );
        let kb = |v: Option<u64>| v.map(|x| format!("{x} KB")).unwrap_or_else(|| "n/a".to_owned());
        t.kv(
            "bench / other processes' CPU s",
            format!("{} / {}", report::opt(self.cpu.bench_cpu_seconds, 2), report::opt(self.cpu.other_cpu_seconds, 2)),
        );
        t.kv("server RSS before / after", format!("{} / {}", kb(self.rss_before_kb), kb(self.rss_after_kb)));
        if let (Some(b), Some(e)) = (&self.baseline, &self.end) {
            t.kv(
                "baseline: tasks / fds / RSS KB",
                format!("{} / {} / {}", b.tokio_tasks, b.open_fds, b.rss_bytes / 1024),
            );
            t.kv("end: tasks / fds / RSS KB", format!("{} / {} / {}", e.tokio_tasks, e.open_fds, e.rss_bytes / 1024));
        }
        for c in &self.checks {
            t.kv(&format!("check: {}", c.name), format!("{} ({})", if c.pass { "pass" } else { "FAIL" }, c.detail));
        }
        if let Some(f) = &self.first_failure {
            t.kv("first failure", f);
        }
        t.print();
    }

    pub fn markdown(&self) -> (String, String) {
        let what = match self.params.cycles {
            Some(n) => format!("{n} cycles"),
            None => format!("{:.0} s", self.params.duration_seconds),
        };
        let params = format!(
            "{} workers, {what}, mix {}, {}% presence, {} resubscribe(s) per connection",
            self.params.workers,
            mix_text(&self.params.mix),
            self.params.presence_percent,
            self.params.resubscribes
        );
        let result = format!(
            "{:.0} connect/disconnect cycles/s, {:.0} subscribes/s, {:.0} unsubscribes/s; cycle p50 {:.2} / p99 {:.2} ms; {} failures; server CPU {} ms per cycle; other load {} CPU s; server RSS {} -> {} KB",
            self.cycles_per_second,
            self.subscribes_per_second,
            self.unsubscribes_per_second,
            self.cycle_latency.p50_ms,
            self.cycle_latency.p99_ms,
            self.failures.values().sum::<u64>(),
            report::opt(self.server_cpu_ms_per_cycle, 3),
            report::opt(self.cpu.other_cpu_seconds, 1),
            self.rss_before_kb.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
            self.rss_after_kb.map(|v| v.to_string()).unwrap_or_else(|| "n/a".into()),
        );
        let result = if self.checks.is_empty() {
            result
        } else {
            let failed: Vec<&str> = self.checks.iter().filter(|c| !c.pass).map(|c| c.name.as_str()).collect();
            if failed.is_empty() {
                format!("{result}; end state back to baseline (all {} checks pass)", self.checks.len())
            } else {
                format!("{result}; FAILED checks: {}", failed.join(", "))
            }
        };
        let result = if self.repeated_for_other_load {
            format!("{result} (second run: other load disturbed the first)")
        } else {
            result
        };
        (params, result)
    }
}

fn mix_text(m: &Mix) -> String {
    format!("graceful={},reset={},pong={}", m.graceful, m.reset, m.pong)
}

/// What `pusher:connection_established` said.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub socket_id: String,
    /// Seconds of silence after which the server pings.
    pub activity_timeout: u64,
}

/// A TCP connection to the server, from `source` if given (and with a receive buffer of
/// `rcvbuf` bytes, set before connecting).
pub async fn tcp(target: &Target, source: Option<IpAddr>, rcvbuf: Option<u32>) -> Result<TcpStream, Failure> {
    let fail = |detail: String| Failure { stage: Stage::Tcp, detail };
    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| fail(e.to_string()))?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).map_err(|e| fail(e.to_string()))?;
    }
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| fail(format!("bind {ip}: {e}")))?;
    }
    let stream = tokio::time::timeout(target.timeout, socket.connect(target.addr))
        .await
        .map_err(|_| fail("timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
    stream.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
    Ok(stream)
}

/// Opens a connection like `pusher::open`, keeping what `connection_established` said (the
/// socket id signs private and presence subscriptions). Every step is bounded by the timeout.
pub async fn connect(target: &Target, source: Option<IpAddr>) -> Result<(Ws, Welcome), Failure> {
    let stream = tcp(target, source, None).await?;
    let (mut ws, _) = tokio::time::timeout(
        target.timeout,
        tokio_tungstenite::client_async_with_config(target.ws_url(), stream, Some(pusher::ws_config(false))),
    )
    .await
    .map_err(|_| Failure { stage: Stage::Handshake, detail: "timed out".into() })?
    .map_err(|e| Failure { stage: Stage::Handshake, detail: e.to_string() })?;
    let welcome = welcome(&mut ws, target.timeout).await?;
    Ok((ws, welcome))
}

/// Reads the first frame, which must be `pusher:connection_established`.
pub async fn welcome(ws: &mut Ws, timeout: Duration) -> Result<Welcome, Failure> {
    let fail = |detail: String| Failure { stage: Stage::Welcome, detail };
    let text = match tokio::time::timeout(timeout, ws.next()).await {
        Err(_) => return Err(fail(format!("no connection_established within {timeout:?}"))),
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(Message::Close(c)))) => return Err(fail(format!("closed by server: {c:?}"))),
        Ok(other) => return Err(fail(format!("unexpected: {other:?}"))),
    };
    let frame = pusher::Frame::parse(text.as_str()).ok_or_else(|| fail(format!("not a Pusher frame: {text}")))?;
    if frame.event != "pusher:connection_established" {
        return Err(fail(format!("{} {}", frame.event, text.as_str())));
    }
    // The data is a JSON string holding a JSON object.
    let data: String = frame.data.and_then(|d| serde_json::from_str(d.get()).ok()).unwrap_or_default();
    let data: serde_json::Value = serde_json::from_str(&data).unwrap_or_default();
    Ok(Welcome {
        socket_id: data["socket_id"].as_str().unwrap_or_default().to_owned(),
        activity_timeout: data["activity_timeout"].as_u64().unwrap_or(120),
    })
}

/// `key:HMAC-SHA256(secret, "socket_id:channel[:channel_data]")`, the auth of a private or
/// presence subscription.
pub fn channel_auth(target: &Target, socket_id: &str, channel: &str, channel_data: Option<&str>) -> String {
    let to_sign = match channel_data {
        Some(d) => format!("{socket_id}:{channel}:{d}"),
        None => format!("{socket_id}:{channel}"),
    };
    let signature = match Hmac::<Sha256>::new_from_slice(target.secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(to_sign.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        }
        // HMAC takes keys of any length; this arm is unreachable in practice.
        Err(_) => String::new(),
    };
    format!("{}:{signature}", target.key)
}

/// Subscribes to any channel: private and presence ones are signed with the app secret, a
/// presence one as `user_id`. Waits for `subscription_succeeded` (answering pings).
pub async fn subscribe_with(
    ws: &mut Ws,
    target: &Target,
    socket_id: &str,
    channel: &str,
    user_id: &str,
) -> Result<(), Failure> {
    let mut data = serde_json::json!({ "channel": channel });
    if channel.starts_with("presence-") {
        let channel_data = serde_json::json!({ "user_id": user_id }).to_string();
        data["auth"] = channel_auth(target, socket_id, channel, Some(&channel_data)).into();
        data["channel_data"] = channel_data.into();
    } else if channel.starts_with("private-") {
        data["auth"] = channel_auth(target, socket_id, channel, None).into();
    }
    let msg = serde_json::json!({ "event": "pusher:subscribe", "data": data }).to_string();
    ws.send(Message::text(msg)).await.map_err(|e| Failure { stage: Stage::Subscribe, detail: e.to_string() })?;
    pusher::wait_event(ws, "pusher_internal:subscription_succeeded", Some(channel), target.timeout, Stage::Subscribe)
        .await
}

/// Ends a connection abruptly: `SO_LINGER` 0, then close, so the server gets a TCP reset.
pub fn reset(ws: Ws) {
    let _ = ws.get_ref().set_zero_linger();
    drop(ws);
}

/// How a cycle ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Graceful,
    Reset,
    PongTimeout,
}

impl Ending {
    fn name(self) -> &'static str {
        match self {
            Ending::Graceful => "graceful",
            Ending::Reset => "reset",
            Ending::PongTimeout => "pong_timeout",
        }
    }
}

/// One cycle; returns the time to `connection_established`.
async fn cycle(
    target: &Target,
    source: Option<IpAddr>,
    channel: &str,
    user_id: &str,
    resubscribes: usize,
    ending: Ending,
) -> Result<Duration, Failure> {
    let t0 = Instant::now();
    let (mut ws, welcome) = connect(target, source).await?;
    let connected = t0.elapsed();
    subscribe_with(&mut ws, target, &welcome.socket_id, channel, user_id).await?;
    if ending == Ending::PongTimeout {
        pong_timeout(ws, &welcome, target.timeout).await?;
        return Ok(connected);
    }
    for _ in 0..resubscribes {
        ws.send(pusher::unsubscribe_msg(channel))
            .await
            .map_err(|e| Failure { stage: Stage::Unsubscribe, detail: e.to_string() })?;
        subscribe_with(&mut ws, target, &welcome.socket_id, channel, user_id).await?;
    }
    match ending {
        Ending::Reset => {
            reset(ws);
            Ok(connected)
        }
        _ => pusher::close(ws, target.timeout).await.map(|()| connected),
    }
}

/// Reads without ever answering a ping until the server closes the socket, which must be with
/// 4201 (pong timeout), within `activity_timeout` + a minute (the pong timeout is not announced).
async fn pong_timeout(mut ws: Ws, welcome: &Welcome, timeout: Duration) -> Result<(), Failure> {
    let fail = |detail: String| Failure { stage: Stage::Close, detail };
    let bound = Duration::from_secs(welcome.activity_timeout + 60) + timeout;
    let closed = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    };
    match tokio::time::timeout(bound, closed).await {
        Ok(Some(4201)) => Ok(()),
        Ok(other) => Err(fail(format!("pong timeout: expected a close with 4201, got {other:?}"))),
        Err(_) => Err(fail(format!("pong timeout: not closed within {bound:?}"))),
    }
}

/// Failures by stage, and the first one's text.
type FailureLog = (BTreeMap<String, u64>, Option<String>);

/// What one phase (warm-up or main) of cycles produced.
struct Phase {
    seconds: f64,
    by_ending: BTreeMap<String, u64>,
    presence: u64,
    failed: u64,
    failures: FailureLog,
    cycle_hist: Histogram<u64>,
    connect_hist: Histogram<u64>,
}

/// Shared counters of a phase.
#[derive(Default)]
struct Counters {
    done: [AtomicU64; 3],
    presence: AtomicU64,
    failed: AtomicU64,
    next_fast: AtomicUsize,
    next_pong: AtomicUsize,
    failures: Mutex<FailureLog>,
}

impl Counters {
    fn completed(&self) -> u64 {
        self.done.iter().map(|d| d.load(Relaxed)).sum()
    }

    fn fail(&self, f: &Failure) {
        self.failed.fetch_add(1, Relaxed);
        if let Ok(mut m) = self.failures.lock() {
            *m.0.entry(f.stage.name().to_owned()).or_default() += 1;
            m.1.get_or_insert_with(|| f.to_string());
        }
    }
}

/// How many cycles a phase runs: graceful and reset ones (split by weight, in a fixed
/// interleaving), and pong-timeout ones; `None` runs until the deadline.
#[derive(Debug, Clone, Copy)]
struct Counts {
    fast: Option<u64>,
    pong: Option<u64>,
}

impl Counts {
    /// `n` cycles split by the mix.
    fn of(n: u64, mix: Mix) -> Self {
        let pong = n * u64::from(mix.pong) / u64::from(mix.total().max(1));
        Self { fast: Some(n - pong), pong: Some(pong) }
    }
}

/// Runs cycles: `workers` tasks for the graceful and reset ones, a pool of `pong_pool` for the
/// pong-timeout ones, until the counts are done or the deadline.
async fn phase(
    target: &Target,
    params: &ChurnParams,
    run_id: &str,
    counts: Counts,
    duration: Duration,
    label: &str,
) -> Phase {
    let c = Arc::new(Counters::default());
    let mix = params.mix;
    let (pong_cycles, fast_cycles) = (counts.pong, counts.fast);
    let fast_weight = u64::from(mix.graceful + mix.reset);
    let started = Instant::now();
    // `None`: no time limit (a cycle count ends the phase instead).
    let deadline = started.checked_add(duration);
    let mut tasks = JoinSet::new();
    let workers = if fast_weight > 0 { params.workers.max(1) } else { 0 };
    let pool = if mix.pong > 0 { params.pong_pool.max(1) } else { 0 };
    for w in 0..workers + pool {
        let pong = w >= workers;
        let (target, c, run_id) = (target.clone(), c.clone(), run_id.to_owned());
        let (resubscribes, source_addrs, channels, presence) =
            (params.resubscribes, params.source_addrs, params.channels.max(1), u64::from(params.presence_percent));
        let limit = if pong { pong_cycles } else { fast_cycles };
        tasks.spawn(async move {
            let mut cycle_hist = report::histogram();
            let mut connect_hist = report::histogram();
            loop {
                let i = if pong { c.next_pong.fetch_add(1, Relaxed) } else { c.next_fast.fetch_add(1, Relaxed) } as u64;
                if limit.is_some_and(|n| i >= n) || (limit.is_none() && deadline.is_some_and(|d| Instant::now() >= d)) {
                    break;
                }
                let ending = if pong {
                    Ending::PongTimeout
                } else if (i % fast_weight) < u64::from(mix.graceful) {
                    Ending::Graceful
                } else {
                    Ending::Reset
                };
                // Every cycle gets its own number (and presence user), pong or not.
                let n = if pong { u64::MAX / 2 + i } else { i };
                let is_presence = (n.wrapping_mul(2_654_435_761) % 100) < presence;
                let k = n % channels as u64;
                let channel =
                    if is_presence { format!("presence-churn-{run_id}-{k}") } else { format!("churn-{run_id}-{k}") };
                let user = format!("u{n}");
                let source = target.source_for(n as usize, source_addrs);
                let t0 = Instant::now();
                match cycle(&target, source, &channel, &user, resubscribes, ending).await {
                    Ok(connected) => {
                        if !pong {
                            report::record(
                                &mut cycle_hist,
                                u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX),
                            );
                        }
                        report::record(&mut connect_hist, u64::try_from(connected.as_micros()).unwrap_or(u64::MAX));
                        c.done[ending as usize].fetch_add(1, Relaxed);
                        if is_presence {
                            c.presence.fetch_add(1, Relaxed);
                        }
                    }
                    Err(f) => {
                        c.fail(&f);
                        // Back off a little so a refusing server is not hammered in a tight loop.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (cycle_hist, connect_hist)
        });
    }

    let mut cycle_hist: Histogram<u64> = report::histogram();
    let mut connect_hist: Histogram<u64> = report::histogram();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut last = 0u64;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(Ok((h, k))) => {
                    let _ = cycle_hist.add(&h);
                    let _ = connect_hist.add(&k);
                }
                Some(Err(_)) => {}
                None => break,
            },
            _ = tick.tick() => {
                let n = c.completed();
                progress(&format!(
                    "[churn{label}] {:>5.0}s cycles={n} (+{}/s) pong_timeouts={} failures={}",
                    started.elapsed().as_secs_f64(),
                    n - last.min(n),
                    c.done[Ending::PongTimeout as usize].load(Relaxed),
                    c.failed.load(Relaxed)
                ));
                last = n;
            }
        }
    }
    let by_ending = [Ending::Graceful, Ending::Reset, Ending::PongTimeout]
        .iter()
        .map(|e| (e.name().to_owned(), c.done[*e as usize].load(Relaxed)))
        .collect();
    let failures = c.failures.lock().map(|m| m.clone()).unwrap_or_default();
    Phase {
        seconds: started.elapsed().as_secs_f64().max(1e-9),
        by_ending,
        presence: c.presence.load(Relaxed),
        failed: c.failed.load(Relaxed),
        failures,
        cycle_hist,
        connect_hist,
    }
}

/// Runs the `churn` scenario.
pub async fn run(target: &Target, params: ChurnParams, server_pid: Option<u32>) -> Result<ChurnReport, String> {
    let pid = server_pid.map(|p| p.to_string());
    let rss = || pid.as_deref().and_then(sys::rss_kb);
    let run_id = format!("{}-{}", std::process::id(), sys::now_nanos() % 1_000_000);
    let probe = soak::Probe::new(target, params.metrics_port)?;
    if params.mix.pong > 0 {
        let (ws, welcome) = connect(target, None).await.map_err(|f| format!("probe connection: {f}"))?;
        reset(ws);
        if welcome.activity_timeout > 10 {
            progress(&format!(
                "[churn] the server's activity_timeout is {} s: each pong-timeout socket takes that plus pong_timeout (start the server with ACTIVITY_TIMEOUT=1 and pong_timeout 1 for churn)",
                welcome.activity_timeout
            ));
        }
    }
    let mut checks = Vec::new();
    let baseline = match &probe {
        Some(p) => {
            // The warm-up fills the pong-timeout pool twice over, so the baseline is taken after
            // the server has held as many sockets at once as the run will: the allocator keeps
            // the pages of its peak, and a lower peak would make the run look like growth.
            let mut counts = Counts::of(params.warmup_cycles, params.mix);
            if params.mix.pong > 0 {
                counts.pong = counts.pong.map(|p| p.max(2 * params.pong_pool as u64));
            }
            let warmup = phase(target, &params, &run_id, counts, Duration::MAX, " warm-up").await;
            if warmup.failed > 0 {
                progress(&format!("[churn] warm-up: {} failures, first: {:?}", warmup.failed, warmup.failures.1));
            }
            let quiet = p.quiescent(sys::secs(params.settle_seconds)).await?;
            if !quiet.is_empty() {
                return Err(format!("the server did not drain after the warm-up: {}", quiet.describe()));
            }
            Some(quiet)
        }
        None => None,
    };
    let errors_before = match &probe {
        Some(p) => Some(p.metric_sum("sockudo_connection_errors_total", &[("error_type", "pong_timeout")]).await?),
        None => None,
    };

    let rss_before = rss();
    let cpu = sys::CpuMeter::start(server_pid);
    let duration = if params.cycles.is_some() { Duration::MAX } else { sys::secs(params.duration_seconds) };
    let counts = match params.cycles {
        Some(n) => Counts::of(n, params.mix),
        None => Counts { fast: None, pong: None },
    };
    let main = phase(target, &params, &run_id, counts, duration, "").await;
    let cpu_use = cpu.stop();

    let mut end = None;
    if let (Some(p), Some(base)) = (&probe, &baseline) {
        let settle = sys::secs(params.settle_seconds);
        let drained = p.drained(settle).await?;
        checks.push(Check {
            name: "connections, channels, presence members at 0".into(),
            pass: drained.is_empty(),
            detail: drained.describe(),
        });
        let back = p.back_to(base, settle).await?;
        let same = |name: &str, a: u64, b: u64| Check {
            name: format!("{name} back to baseline"),
            pass: a == b,
            detail: format!("baseline {a}, end {b}"),
        };
        checks.push(same("tokio tasks", base.tokio_tasks, back.tokio_tasks));
        checks.push(same("open fds", base.open_fds, back.open_fds));
        let ratio = back.rss_bytes as f64 / base.rss_bytes.max(1) as f64;
        checks.push(Check {
            name: "RSS within 10% of baseline".into(),
            pass: ratio <= 1.10,
            detail: format!(
                "baseline {} KB, end {} KB ({:+.1}%)",
                base.rss_bytes / 1024,
                back.rss_bytes / 1024,
                (ratio - 1.0) * 100.0
            ),
        });
        if let Some(before) = errors_before {
            let after = p.metric_sum("sockudo_connection_errors_total", &[("error_type", "pong_timeout")]).await?;
            let want = main.by_ending.get("pong_timeout").copied().unwrap_or(0);
            checks.push(Check {
                name: "pong timeouts counted once each".into(),
                pass: (after - before).round() as u64 == want,
                detail: format!("{want} pong-timeout sockets, counter +{}", after - before),
            });
        }
        checks.push(Check {
            name: "no failed cycles".into(),
            pass: main.failed == 0,
            detail: format!("{} failed", main.failed),
        });
        end = Some(back);
    } else {
        // Without /stats, give the server a moment to finish closing before reading its RSS.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let rss_after = rss();
    let n = main.by_ending.values().sum::<u64>();
    let fast = n - main.by_ending.get("pong_timeout").copied().unwrap_or(0);
    let seconds = main.seconds;
    Ok(ChurnReport {
        scenario: "churn",
        server: format!("{}:{}", target.host, target.port),
        seconds,
        cycles: n,
        cycles_per_second: n as f64 / seconds,
        cycles_by_ending: main.by_ending,
        presence_cycles: main.presence,
        subscribes_per_second: (n + fast * params.resubscribes as u64) as f64 / seconds,
        unsubscribes_per_second: (fast * params.resubscribes as u64) as f64 / seconds,
        failures: main.failures.0,
        first_failure: main.failures.1,
        cycle_latency: Latency::of(&main.cycle_hist),
        connect_latency: Latency::of(&main.connect_hist),
        server_cpu_seconds: cpu_use.server_cpu_seconds,
        server_cpu_ms_per_cycle: cpu_use.server_cpu_seconds.filter(|_| n > 0).map(|s| s * 1000.0 / n as f64),
        cpu: cpu_use,
        rss_before_kb: rss_before,
        rss_after_kb: rss_after,
        baseline,
        end,
        checks,
        params,
        repeated_for_other_load: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mixes() {
        assert_eq!(parse_mix("graceful=6,reset=3,pong=1"), Ok(Mix { graceful: 6, reset: 3, pong: 1 }));
        assert_eq!(parse_mix("reset"), Ok(Mix { graceful: 0, reset: 1, pong: 0 }));
        assert!(parse_mix("graceful=0").is_err());
        assert!(parse_mix("linger=1").is_err());
    }

    #[test]
    fn signs_channels_like_the_pusher_docs() {
        // The worked example of Pusher's "Generating authentication signatures" (private channel).
        let t = Target {
            host: "127.0.0.1".into(),
            port: 6001,
            app_id: "1".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
            addr: "127.0.0.1:6001".parse().expect("literal address"),
            timeout: Duration::from_secs(1),
            tls: None,
        };
        assert_eq!(
            channel_auth(&t, "1234.1234", "private-foobar", None),
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
    }
}
