//! Fan-out: S subscribers on C channels, a publisher on the signed HTTP API at R events/s.
//!
//! A [`Session`] holds the subscribed connections; each [`Session::run_step`] publishes at one
//! rate for a while (the saturation scenario runs several steps on the same session). Every
//! payload is `step:seq:nanos` — the step number, the sequence number within its channel and
//! the tool's monotonic clock read just before the HTTP request is built and sent — so each
//! subscriber task measures publish-to-delivery latency in its own HdrHistogram and counts
//! every sequence number it sees. At the end of a step the controller waits for in-flight
//! publishes, drains (until every expected delivery arrived, or `drain` passed), then asks
//! each subscriber for its histogram and its missing / duplicated / unexpected counts against
//! the set of publishes the server acknowledged with 200.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::pusher::{self, Frame, PublishOutcome, Publisher, Target, Ws};
use crate::report::{self, progress, Latency};
use crate::sys::{self, now_nanos, CpuMeter, CpuUse};

/// How the subscribers and the publisher are set up.
#[derive(Debug, Clone, Serialize)]
pub struct SessionParams {
    pub subscribers: usize,
    pub channels: usize,
    pub connect_concurrency: usize,
    /// Concurrent publish requests (and keep-alive connections in the pool).
    pub max_inflight: usize,
    /// How long to wait after the last publish for in-flight deliveries.
    pub drain_seconds: f64,
    /// Loopback source addresses to cycle over (0: let the kernel choose).
    pub source_addrs: usize,
    /// Ports (on the same host) the subscribers are spread over round-robin (subscriber i
    /// connects to port i mod P); empty: all on the target's port. Publishes always go to the
    /// target's port. For cross-node fan-out through a cluster adapter.
    pub subscribe_ports: Vec<u16>,
}

/// How opening the subscribers went.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectSummary {
    pub requested: usize,
    pub subscribed: usize,
    pub failed: usize,
    pub failures: BTreeMap<String, u64>,
    pub seconds: f64,
    pub per_second: f64,
    /// Time from TCP connect to `subscription_succeeded`, per connection.
    pub latency: Latency,
    /// Subscribed connections per port (port, count), in the order of `subscribe_ports`
    /// (or the target's port alone).
    pub per_port: Vec<(u16, usize)>,
}

/// Everything measured in one publishing step.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub step: u32,
    pub target_rate: f64,
    pub duration_seconds: f64,
    pub published: u64,
    pub achieved_rate: f64,
    pub http_ok: u64,
    pub http_errors: u64,
    pub http_error_kinds: BTreeMap<String, u64>,
    /// Worst delay between a publish's scheduled time and its start (publisher falling behind).
    pub publish_lag_max_ms: f64,
    /// HTTP request round-trip time.
    pub publish_rtt: Latency,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    pub deliveries_per_second: f64,
    /// Publish-to-delivery latency over all deliveries.
    pub latency: Latency,
    pub missing: u64,
    pub duplicates: u64,
    /// Deliveries of publishes that had not been acknowledged with 200.
    pub unexpected: u64,
    /// Subscribers whose connection ended during the step.
    pub subscribers_lost: u64,
    /// Deliveries of an earlier step that arrived after it was accounted.
    pub late_from_earlier_steps: u64,
    /// Bench frames that could not be parsed or came on the wrong channel.
    pub stray_frames: u64,
    /// Time from the last publish's response until the last expected delivery (or the drain limit).
    pub drain_ms: f64,
    pub cpu: CpuUse,
    pub server_cpu_seconds_per_million_deliveries: Option<f64>,
    pub bench_cpu_seconds_per_million_deliveries: Option<f64>,
    /// Share of the machine (0..1) that other processes used during the step.
    pub other_load_share: Option<f64>,
}

impl StepResult {
    /// What is wrong with the step, if anything: the limits saturation stops at.
    pub fn problems(&self, p99_limit_ms: Option<f64>) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(limit) = p99_limit_ms {
            if self.latency.p99_ms > limit {
                p.push(format!("p99 {:.2} ms > {limit} ms", self.latency.p99_ms));
            }
        }
        if self.http_errors > 0 {
            p.push(format!("{} HTTP errors", self.http_errors));
        }
        if self.missing > 0 {
            p.push(format!("{} lost", self.missing));
        }
        if self.duplicates > 0 {
            p.push(format!("{} duplicated", self.duplicates));
        }
        if self.subscribers_lost > 0 {
            p.push(format!("{} subscribers disconnected", self.subscribers_lost));
        }
        if self.achieved_rate < 0.9 * self.target_rate {
            p.push(format!("publisher reached only {:.1}/s of {:.1}/s", self.achieved_rate, self.target_rate));
        }
        p
    }

    pub fn table_header() -> &'static [&'static str] {
        &[
            "step",
            "pub/s",
            "achieved",
            "deliveries/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "lost",
            "dup",
            "http err",
            "srv CPU s/M",
            "bench CPU s/M",
        ]
    }

    pub fn table_row(&self) -> Vec<String> {
        vec![
            self.step.to_string(),
            format!("{:.1}", self.target_rate),
            format!("{:.1}", self.achieved_rate),
            format!("{:.0}", self.deliveries_per_second),
            format!("{:.2}", self.latency.p50_ms),
            format!("{:.2}", self.latency.p90_ms),
            format!("{:.2}", self.latency.p99_ms),
            format!("{:.2}", self.latency.max_ms),
            self.missing.to_string(),
            self.duplicates.to_string(),
            self.http_errors.to_string(),
            report::opt(self.server_cpu_seconds_per_million_deliveries, 2),
            report::opt(self.bench_cpu_seconds_per_million_deliveries, 2),
            self.other_load_share.map(|s| format!("{:.0}%", s * 100.0)).unwrap_or_else(|| "n/a".to_owned()),
        ]
    }
}

/// Counters shared by the subscriber tasks, the publisher and the progress line.
#[derive(Default)]
struct Shared {
    delivered: AtomicU64,
    late: AtomicU64,
    stray: AtomicU64,
    disconnects: AtomicU64,
    sent: AtomicU64,
    http_ok: AtomicU64,
    http_err: AtomicU64,
}

/// What one subscriber saw in one step.
struct SubStats {
    hist: Histogram<u64>,
    received: u64,
    missing: u64,
    duplicates: u64,
    unexpected: u64,
}

enum Cmd {
    /// Account step `step` against the acknowledged publishes (per channel, per sequence).
    Report {
        step: u32,
        acked: Arc<Vec<Vec<bool>>>,
        reply: oneshot::Sender<SubStats>,
    },
    Close,
}

struct StepRecv {
    hist: Histogram<u64>,
    counts: Vec<u16>,
    received: u64,
}

/// Largest sequence number a subscriber tracks (guards against garbage payloads).
const MAX_SEQ: usize = 50_000_000;

/// One subscribed connection, read by its own task.
struct Subscriber {
    ws: Ws,
    channel_index: usize,
    channel: String,
    shared: Arc<Shared>,
    steps: Vec<(u32, StepRecv)>,
    accounted_upto: u32,
}

/// Parses a `step:seq:nanos` payload.
fn parse_payload(s: &str) -> Option<(u32, usize, u64)> {
    let mut it = s.splitn(3, ':');
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

impl Subscriber {
    async fn run(mut self, mut cmds: mpsc::Receiver<Cmd>) {
        let mut alive = true;
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Report { step, acked, reply }) => {
                        let _ = reply.send(self.account(step, &acked));
                    }
                    Some(Cmd::Close) | None => {
                        if alive {
                            let _ = pusher::close(self.ws, Duration::from_secs(2)).await;
                        }
                        return;
                    }
                },
                msg = self.ws.next(), if alive => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if let Some(reply) = self.on_text(t.as_str()) {
                            if self.ws.send(reply).await.is_err() {
                                alive = false;
                                self.shared.disconnects.fetch_add(1, Relaxed);
                            }
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        alive = false;
                        self.shared.disconnects.fetch_add(1, Relaxed);
                    }
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    /// Handles a text frame; returns a frame to send back (the pong), if any.
    fn on_text(&mut self, text: &str) -> Option<Message> {
        let now = now_nanos();
        let Some(frame) = Frame::parse(text) else {
            self.shared.stray.fetch_add(1, Relaxed);
            return None;
        };
        match frame.event {
            "bench" => {
                let parsed = frame.data_str().and_then(parse_payload);
                let Some((step, seq, sent)) = parsed.filter(|_| frame.channel == Some(self.channel.as_str())) else {
                    self.shared.stray.fetch_add(1, Relaxed);
                    return None;
                };
                if step <= self.accounted_upto {
                    self.shared.late.fetch_add(1, Relaxed);
                    return None;
                }
                if seq >= MAX_SEQ {
                    self.shared.stray.fetch_add(1, Relaxed);
                    return None;
                }
                let r = self.step_mut(step);
                report::record(&mut r.hist, now.saturating_sub(sent) / 1000);
                if seq >= r.counts.len() {
                    r.counts.resize(seq + 1, 0);
                }
                r.counts[seq] = r.counts[seq].saturating_add(1);
                r.received += 1;
                self.shared.delivered.fetch_add(1, Relaxed);
                None
            }
            "pusher:ping" => Some(pusher::pong()),
            _ => None,
        }
    }

    fn step_mut(&mut self, step: u32) -> &mut StepRecv {
        let i = match self.steps.iter().position(|(s, _)| *s == step) {
            Some(i) => i,
            None => {
                self.steps.push((step, StepRecv { hist: report::histogram(), counts: Vec::new(), received: 0 }));
                self.steps.len() - 1
            }
        };
        &mut self.steps[i].1
    }

    fn account(&mut self, step: u32, acked: &[Vec<bool>]) -> SubStats {
        self.accounted_upto = self.accounted_upto.max(step);
        let recv = match self.steps.iter().position(|(s, _)| *s == step) {
            Some(i) => self.steps.swap_remove(i).1,
            None => StepRecv { hist: report::histogram(), counts: Vec::new(), received: 0 },
        };
        self.steps.retain(|(s, _)| *s > step);
        let acked: &[bool] = acked.get(self.channel_index).map(Vec::as_slice).unwrap_or(&[]);
        let count = |i: usize| recv.counts.get(i).copied().unwrap_or(0);
        let missing = acked.iter().enumerate().filter(|(i, ok)| **ok && count(*i) == 0).count() as u64;
        let duplicates = recv.counts.iter().map(|c| u64::from(c.saturating_sub(1))).sum();
        let unexpected =
            recv.counts.iter().enumerate().filter(|(i, c)| **c > 0 && !acked.get(*i).copied().unwrap_or(false)).count()
                as u64;
        SubStats { hist: recv.hist, received: recv.received, missing, duplicates, unexpected }
    }
}

struct SubHandle {
    cmds: mpsc::Sender<Cmd>,
}

/// Subscribed connections plus the publisher.
pub struct Session {
    target: Target,
    params: SessionParams,
    channel_names: Vec<String>,
    subs_per_channel: Vec<u64>,
    subs: Vec<SubHandle>,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
    publisher: Publisher,
    server_pid: Option<u32>,
    pub connect: ConnectSummary,
}

impl Session {
    /// Opens and subscribes the subscribers (bounded concurrency, each step bounded in time).
    pub async fn open(target: &Target, params: SessionParams, server_pid: Option<u32>) -> Result<Self, String> {
        let channels = params.channels.max(1);
        let run_id = format!("{}-{}", std::process::id(), now_nanos() % 1_000_000);
        let channel_names: Vec<String> = (0..channels).map(|c| format!("bench-{run_id}-{c}")).collect();
        let publisher = Publisher::new(target, params.max_inflight)?;

        // One target per subscriber port (all on the target's host and credentials).
        let sub_targets: Vec<Target> = if params.subscribe_ports.is_empty() {
            vec![target.clone()]
        } else {
            params
                .subscribe_ports
                .iter()
                .map(|&p| {
                    let mut t = target.clone();
                    t.port = p;
                    t.addr.set_port(p);
                    t
                })
                .collect()
        };

        let started = Instant::now();
        let limit = Arc::new(Semaphore::new(params.connect_concurrency.max(1)));
        let mut opening = JoinSet::new();
        for i in 0..params.subscribers {
            let (target, limit) = (sub_targets[i % sub_targets.len()].clone(), limit.clone());
            let channel = channel_names[i % channels].clone();
            let source = target.source_for(i, params.source_addrs);
            opening.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let t0 = Instant::now();
                let mut ws = pusher::open(&target, source, pusher::ws_config(true)).await?;
                pusher::subscribe(&mut ws, &channel, target.timeout).await?;
                Ok::<_, pusher::Failure>((i, ws, t0.elapsed()))
            });
        }
        let mut opened: Vec<(usize, Ws)> = Vec::with_capacity(params.subscribers);
        let mut failures: BTreeMap<String, u64> = BTreeMap::new();
        let mut hist = report::histogram();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut first_error: Option<String> = None;
        loop {
            tokio::select! {
                joined = opening.join_next() => match joined {
                    Some(Ok(Ok((i, ws, took)))) => {
                        report::record(&mut hist, u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
                        opened.push((i, ws));
                    }
                    Some(Ok(Err(f))) => {
                        first_error.get_or_insert_with(|| f.to_string());
                        *failures.entry(f.stage.name().to_owned()).or_default() += 1;
                    }
                    Some(Err(e)) => *failures.entry(format!("task: {e}")).or_default() += 1,
                    None => break,
                },
                _ = tick.tick() => progress(&format!(
                    "[connect] {:>4.0}s subscribed={}/{} failed={}",
                    started.elapsed().as_secs_f64(), opened.len(), params.subscribers,
                    failures.values().sum::<u64>()
                )),
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        if let Some(e) = &first_error {
            progress(&format!("[connect] first failure: {e}"));
        }
        if opened.is_empty() && params.subscribers > 0 {
            return Err(format!("no subscriber could connect: {}", first_error.unwrap_or_default()));
        }
        let connect = ConnectSummary {
            requested: params.subscribers,
            subscribed: opened.len(),
            failed: params.subscribers - opened.len(),
            failures,
            seconds,
            per_second: opened.len() as f64 / seconds.max(1e-9),
            latency: Latency::of(&hist),
            per_port: sub_targets
                .iter()
                .enumerate()
                .map(|(k, t)| (t.port, opened.iter().filter(|(i, _)| i % sub_targets.len() == k).count()))
                .collect(),
        };

        let shared = Arc::new(Shared::default());
        let mut subs_per_channel = vec![0u64; channels];
        let mut subs = Vec::with_capacity(opened.len());
        let mut tasks = JoinSet::new();
        for (i, ws) in opened {
            let channel_index = i % channels;
            subs_per_channel[channel_index] += 1;
            let (tx, rx) = mpsc::channel(4);
            let sub = Subscriber {
                ws,
                channel_index,
                channel: channel_names[channel_index].clone(),
                shared: shared.clone(),
                steps: Vec::new(),
                accounted_upto: 0,
            };
            tasks.spawn(sub.run(rx));
            subs.push(SubHandle { cmds: tx });
        }
        Ok(Self {
            target: target.clone(),
            params,
            channel_names,
            subs_per_channel,
            subs,
            tasks,
            shared,
            publisher,
            server_pid,
            connect,
        })
    }

    /// Publishes at `rate` events/s for `duration`, then drains and accounts.
    pub async fn run_step(&mut self, step: u32, rate: f64, duration: Duration, label: &str) -> StepResult {
        let channels = self.channel_names.len();
        let total = (rate * duration.as_secs_f64()).round().max(0.0) as u64;
        let per_channel = |c: usize| -> usize {
            let total = total as usize;
            if c < total {
                (total - c).div_ceil(channels)
            } else {
                0
            }
        };
        let status: Arc<Vec<Vec<AtomicU8>>> =
            Arc::new((0..channels).map(|c| (0..per_channel(c)).map(|_| AtomicU8::new(0)).collect()).collect());
        let error_kinds: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let rtt: Arc<Mutex<Histogram<u64>>> = Arc::new(Mutex::new(report::histogram()));
        let shared = self.shared.clone();
        shared.delivered.store(0, Relaxed);
        shared.sent.store(0, Relaxed);
        shared.http_ok.store(0, Relaxed);
        shared.http_err.store(0, Relaxed);
        let late_before = shared.late.load(Relaxed);
        let stray_before = shared.stray.load(Relaxed);
        let lost_before = shared.disconnects.load(Relaxed);
        let lag_us = Arc::new(AtomicU64::new(0));

        // Progress line, once a second, until the step ends.
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let progress_task = {
            let shared = shared.clone();
            let label = label.to_owned();
            let lag_us = lag_us.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.tick().await;
                let mut last = 0u64;
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => return,
                        _ = tick.tick() => {
                            let d = shared.delivered.load(Relaxed);
                            progress(&format!(
                                "[{label}] {:>4.0}s sent={} ok={} err={} delivered={} ({}/s) lag_max={:.1}ms lost_subs={}",
                                started.elapsed().as_secs_f64(),
                                shared.sent.load(Relaxed),
                                shared.http_ok.load(Relaxed),
                                shared.http_err.load(Relaxed),
                                d,
                                d - last.min(d),
                                lag_us.load(Relaxed) as f64 / 1000.0,
                                shared.disconnects.load(Relaxed),
                            ));
                            last = d;
                        }
                    }
                }
            })
        };

        let cpu = CpuMeter::start(self.server_pid);
        let inflight = Arc::new(Semaphore::new(self.params.max_inflight.max(1)));
        let start = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / rate.max(1e-6));
        for i in 0..total {
            let deadline = start + interval.mul_f64(i as f64);
            sys::sleep_until(deadline).await;
            let Ok(permit) = inflight.clone().acquire_owned().await else {
                break;
            };
            let lag = u64::try_from(deadline.elapsed().as_micros()).unwrap_or(u64::MAX);
            lag_us.fetch_max(lag, Relaxed);
            let c = (i % channels as u64) as usize;
            let seq = (i / channels as u64) as usize;
            let (publisher, channel) = (self.publisher.clone(), self.channel_names[c].clone());
            let (status, error_kinds, rtt, shared) = (status.clone(), error_kinds.clone(), rtt.clone(), shared.clone());
            tokio::spawn(async move {
                let t0 = Instant::now();
                let data = format!("{step}:{seq}:{}", now_nanos());
                shared.sent.fetch_add(1, Relaxed);
                let outcome = publisher.publish(&channel, &data).await;
                if let Ok(mut h) = rtt.lock() {
                    report::record(&mut h, u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                let kind = match outcome {
                    PublishOutcome::Ok => None,
                    PublishOutcome::Status(s) => Some(format!("HTTP {s}")),
                    PublishOutcome::Transport(e) => {
                        Some(format!("transport: {}", e.chars().take(120).collect::<String>()))
                    }
                };
                match kind {
                    None => {
                        status[c][seq].store(1, Relaxed);
                        shared.http_ok.fetch_add(1, Relaxed);
                    }
                    Some(k) => {
                        status[c][seq].store(2, Relaxed);
                        shared.http_err.fetch_add(1, Relaxed);
                        if let Ok(mut m) = error_kinds.lock() {
                            *m.entry(k).or_default() += 1;
                        }
                    }
                }
                drop(permit);
            });
        }
        let publish_window = start.elapsed();
        // Wait for the in-flight publishes (each is bounded by the HTTP client's timeout).
        let all = u32::try_from(self.params.max_inflight.max(1)).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(Duration::from_secs(15), inflight.acquire_many(all)).await;
        let published_done = Instant::now();

        let acked: Vec<Vec<bool>> = status.iter().map(|ch| ch.iter().map(|s| s.load(Relaxed) == 1).collect()).collect();
        let expected: u64 = acked
            .iter()
            .zip(&self.subs_per_channel)
            .map(|(ch, subs)| ch.iter().filter(|ok| **ok).count() as u64 * subs)
            .sum();
        let drain = sys::secs(self.params.drain_seconds);
        while shared.delivered.load(Relaxed) < expected && published_done.elapsed() < drain {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let drained = Instant::now();
        let cpu_use = cpu.stop();
        let _ = stop_tx.send(());
        let _ = progress_task.await;

        // Account every subscriber's view of the step.
        let acked = Arc::new(acked);
        let mut replies = Vec::with_capacity(self.subs.len());
        for s in &self.subs {
            let (tx, rx) = oneshot::channel();
            if s.cmds.send(Cmd::Report { step, acked: acked.clone(), reply: tx }).await.is_ok() {
                replies.push(rx);
            }
        }
        let mut hist = report::histogram();
        let (mut received, mut missing, mut duplicates, mut unexpected) = (0u64, 0u64, 0u64, 0u64);
        for rx in replies {
            if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(10), rx).await {
                let _ = hist.add(&s.hist);
                received += s.received;
                missing += s.missing;
                duplicates += s.duplicates;
                unexpected += s.unexpected;
            }
        }
        let published = shared.sent.load(Relaxed);
        let http_ok = shared.http_ok.load(Relaxed);
        let active = (drained - start).as_secs_f64().max(1e-9);
        let per_million = |cpu: Option<f64>| cpu.filter(|_| received > 0).map(|c| c * 1.0e6 / received as f64);
        let rtt = rtt.lock().map(|h| Latency::of(&h)).unwrap_or_default();
        let error_kinds = error_kinds.lock().map(|m| m.clone()).unwrap_or_default();
        StepResult {
            step,
            target_rate: rate,
            duration_seconds: duration.as_secs_f64(),
            published,
            achieved_rate: published as f64 / publish_window.max(duration).as_secs_f64().max(1e-9),
            http_ok,
            http_errors: shared.http_err.load(Relaxed)
                + published.saturating_sub(http_ok + shared.http_err.load(Relaxed)),
            http_error_kinds: error_kinds,
            publish_lag_max_ms: lag_us.load(Relaxed) as f64 / 1000.0,
            publish_rtt: rtt,
            expected_deliveries: expected,
            deliveries: received,
            deliveries_per_second: received as f64 / active,
            latency: Latency::of(&hist),
            missing,
            duplicates,
            unexpected,
            subscribers_lost: shared.disconnects.load(Relaxed) - lost_before,
            late_from_earlier_steps: shared.late.load(Relaxed) - late_before,
            stray_frames: shared.stray.load(Relaxed) - stray_before,
            drain_ms: (drained - published_done).as_secs_f64() * 1000.0,
            other_load_share: cpu_use.other_share(),
            server_cpu_seconds_per_million_deliveries: per_million(cpu_use.server_cpu_seconds),
            bench_cpu_seconds_per_million_deliveries: per_million(cpu_use.bench_cpu_seconds),
            cpu: cpu_use,
        }
    }

    /// Closes every subscriber (bounded in time).
    pub async fn close(mut self) {
        for s in &self.subs {
            let _ = s.cmds.send(Cmd::Close).await;
        }
        let _ =
            tokio::time::timeout(Duration::from_secs(10), async { while self.tasks.join_next().await.is_some() {} })
                .await;
        self.tasks.abort_all();
    }

    pub fn target(&self) -> &Target {
        &self.target
    }
}

/// The `fanout` scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub scenario: &'static str,
    pub server: String,
    pub params: SessionParams,
    pub rate: f64,
    pub duration_seconds: f64,
    pub connect: ConnectSummary,
    pub result: StepResult,
    /// No HTTP errors, no lost or duplicated messages, no subscriber lost.
    pub clean: bool,
    /// The first run was disturbed by other processes (see `--quiet-below`) and run again.
    pub repeated_for_other_load: bool,
}

impl FanoutReport {
    pub fn print(&self) {
        let r = &self.result;
        let mut t = report::Table::new(
            format!(
                "fan-out: {} subscribers on {} channel(s), {:.1} publishes/s for {:.0} s against {}",
                self.connect.subscribed, self.params.channels, self.rate, self.duration_seconds, self.server
            ),
            &["figure", "value"],
        );
        t.kv(
            "subscribers connected",
            format!(
                "{}/{} in {:.2} s ({:.0}/s)",
                self.connect.subscribed, self.connect.requested, self.connect.seconds, self.connect.per_second
            ),
        );
        if self.connect.per_port.len() > 1 {
            let ports: Vec<String> = self.connect.per_port.iter().map(|(p, n)| format!("{n} on :{p}")).collect();
            t.kv("subscribers per port (publisher on the target port)", ports.join(", "));
        }
        t.kv("published (achieved rate)", format!("{} ({:.1}/s)", r.published, r.achieved_rate));
        t.kv("HTTP errors", format!("{} {:?}", r.http_errors, r.http_error_kinds));
        t.kv("publish HTTP RTT p50 / p99 ms", format!("{:.2} / {:.2}", r.publish_rtt.p50_ms, r.publish_rtt.p99_ms));
        t.kv("deliveries (expected)", format!("{} ({})", r.deliveries, r.expected_deliveries));
        t.kv("deliveries/s", format!("{:.0}", r.deliveries_per_second));
        t.kv("latency p50 ms", format!("{:.2}", r.latency.p50_ms));
        t.kv("latency p90 ms", format!("{:.2}", r.latency.p90_ms));
        t.kv("latency p99 ms", format!("{:.2}", r.latency.p99_ms));
        t.kv("latency max ms", format!("{:.2}", r.latency.max_ms));
        t.kv("lost / duplicated / unexpected", format!("{} / {} / {}", r.missing, r.duplicates, r.unexpected));
        t.kv("subscribers disconnected", r.subscribers_lost);
        t.kv(
            "server CPU s (per million deliveries)",
            format!(
                "{} ({})",
                report::opt(r.cpu.server_cpu_seconds, 2),
                report::opt(r.server_cpu_seconds_per_million_deliveries, 2)
            ),
        );
        t.kv(
            &format!("other processes' CPU s ({} cores, {:.1} s)", r.cpu.cores, r.cpu.wall_seconds),
            report::opt(r.cpu.other_cpu_seconds, 2),
        );
        t.kv(
            "bench CPU s (per million deliveries)",
            format!(
                "{} ({})",
                report::opt(r.cpu.bench_cpu_seconds, 2),
                report::opt(r.bench_cpu_seconds_per_million_deliveries, 2)
            ),
        );
        t.kv(
            "verdict",
            if self.clean { "clean (no errors, loss or duplicates)".to_owned() } else { r.problems(None).join("; ") },
        );
        t.print();
    }

    pub fn markdown(&self) -> (String, String) {
        let r = &self.result;
        let mut params = format!(
            "{} subs x {} ch, {:.0} pub/s, {:.0} s",
            self.connect.subscribed, self.params.channels, self.rate, self.duration_seconds
        );
        if self.connect.per_port.len() > 1 {
            let ports: Vec<String> = self.connect.per_port.iter().map(|(_, n)| n.to_string()).collect();
            params.push_str(&format!(", subscribers split {} over {} nodes", ports.join("/"), ports.len()));
        }
        let result = format!(
            "{:.0} deliveries/s; latency p50 {:.2} / p90 {:.2} / p99 {:.2} / max {:.2} ms; lost {}, dup {}, HTTP errors {}; CPU s per million deliveries: server {}, bench {}; other load {} CPU s in {:.0} s",
            r.deliveries_per_second,
            r.latency.p50_ms,
            r.latency.p90_ms,
            r.latency.p99_ms,
            r.latency.max_ms,
            r.missing,
            r.duplicates,
            r.http_errors,
            report::opt(r.server_cpu_seconds_per_million_deliveries, 2),
            report::opt(r.bench_cpu_seconds_per_million_deliveries, 2),
            report::opt(r.cpu.other_cpu_seconds, 1),
            r.cpu.wall_seconds
        );
        let result = if self.repeated_for_other_load {
            format!("{result} (second run: other load disturbed the first)")
        } else {
            result
        };
        (params, result)
    }
}

/// Runs the `fanout` scenario.
pub async fn run(
    target: &Target,
    params: SessionParams,
    rate: f64,
    duration: Duration,
    server_pid: Option<u32>,
    quiet: sys::Quiet,
) -> Result<FanoutReport, String> {
    let mut session = Session::open(target, params.clone(), server_pid).await?;
    let mut result = session.run_step(1, rate, duration, "fanout").await;
    let mut repeated_for_other_load = false;
    let other = result.other_load_share.unwrap_or(0.0);
    if quiet.below > 0.0 && other >= quiet.below {
        progress(&format!("[fanout] other processes used {:.0}% of the machine; repeating the run", other * 100.0));
        sys::wait_quiet(quiet.below, quiet.wait, server_pid).await;
        result = session.run_step(2, rate, duration, "fanout, repeated").await;
        repeated_for_other_load = true;
    }
    let connect = session.connect.clone();
    let server = format!("{}:{}", session.target().host, session.target().port);
    session.close().await;
    let clean = result.problems(None).is_empty() && result.unexpected == 0;
    Ok(FanoutReport {
        scenario: "fanout",
        server,
        params,
        rate,
        duration_seconds: duration.as_secs_f64(),
        connect,
        result,
        clean,
        repeated_for_other_load,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_payloads() {
        assert_eq!(parse_payload("3:17:123456"), Some((3, 17, 123456)));
        assert_eq!(parse_payload("3:17"), None);
        assert_eq!(parse_payload("x:1:2"), None);
    }
}
